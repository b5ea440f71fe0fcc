"""Rollouts for RL (GRPO, PPO): batched sampling through the inference Engine, and the objective base that
scores them.

A rollout batch is left-padded prompts (the RL collate's form); `sample` hands their tokens to the policy's
Engine (`policy_engine`), whose decode loop and sampler serve the CLI and the server too: a ragged KV cache
row per completion, one forward per step for every unfinished row, rows leaving at eos. The log-prob of each
sampled token under the policy (temperature-1 softmax, whatever the sampling temperature or top-k) is recorded
as it is drawn: these are the "old policy" log-probs of the clipped objectives. The result comes back as a
`Rollout`: prompt columns as given, completions padded after each row's eos.

Rollouts may run in another dtype than the policy trains in (`--rollout-dtype bf16`: an fp32 policy sampled
through a bf16 copy of its weights, refreshed at every rollout), as RL systems with a separate inference engine
do. The sampled tokens then come from the bf16 copy, and the old-policy log-probs from the policy itself, so
the first update's importance ratio is exactly 1 and the clip sees only what the updates changed, not the
rounding between dtypes: with one optimizer step per rollout batch they are the loss's own forward, detached (no
extra cost); when a rollout batch is reused, one forward without grad over it when it is sampled
(`RLObjective.experience`), as TRL computes them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from functools import partial

import torch

from minimind.device import warn_if_slow_on_cpu
from minimind.infer.engine import Engine
from minimind.infer.options import compile_allowed
from minimind.info import forward_flops, sampling_flops, training_flops
from minimind.kernels.training import plain_model, training_view
from minimind.model.modeling_minimind import MiniMindForCausalLM
from minimind.train.objective import LossOutput, Objective
from minimind.train.reference import completion_head_logprobs, unwrap
from minimind.train.rewards import Reward, answer_correct


@dataclass
class Rollout:
    """N sampled completions of left-padded prompts (P columns), T generated columns."""

    sequences: torch.Tensor  # (N, P + T) prompt then completion; pad after a row's eos
    attention_mask: torch.Tensor  # (N, P + T) 1 on real prompt tokens and on completion tokens up to its eos
    completion_mask: torch.Tensor  # (N, T) 1 on generated tokens up to and including eos
    logprobs: torch.Tensor  # (N, T) log π_old(token) when it was sampled; 0 where masked
    finished: torch.Tensor  # (N,) bool: the row produced eos within max_new_tokens
    prompt_len: int

    @property
    def completion_ids(self) -> torch.Tensor:
        """(N, T) the generated columns."""
        return self.sequences[:, self.prompt_len :]

    def lengths(self) -> torch.Tensor:
        """(N,) tokens generated per row, eos included."""
        return self.completion_mask.sum(-1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (ids, attention mask), both (B, longest), padded on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def prompt_batch(items: list[dict], pad_id: int = 0) -> dict:
    """RL collate: left-padded `input_ids`/`attention_mask` of the prompts, plus their answers and messages."""
    ids, mask = left_pad([item["prompt_ids"] for item in items], pad_id)
    return {"input_ids": ids, "attention_mask": mask, "answer": [item["answer"] for item in items],
            "prompt": [item["prompt"] for item in items]}


@torch.no_grad()
def sample(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
           eos_id: int, pad_id: int = 0, temperature: float = 1.0, top_k: int = 0, seed: int | None = None,
           compile: bool = False, dtype: torch.dtype | None = None) -> Rollout:
    """Sample one completion per row of left-padded prompts (temperature 0 = greedy) with the policy's Engine
    (`policy_engine`): its KV cache, decode loop and sampler.

    Row i draws from its own generator seeded `seed + i`; without a seed, one is drawn from the global torch RNG,
    so a seeded run repeats, and so does a resumed one (checkpoints keep that RNG's state). Greedy draws nothing.
    A row stops at `eos_id`, after `max_new_tokens` or at the model's context. `compile`: decode steps of
    several rows through a compiled step (`Engine(compile_batched=True)`, compiled once per policy); the same
    tokens and log-probs as eager decoding, up to float rounding. `dtype`: sample through a copy of the weights in
    that dtype (None: the policy's own); the log-probs are then that copy's.
    """
    engine = policy_engine(model, eos_id, pad_id, compile, dtype)
    keep = attention_mask.bool().cpu()
    prompts = [row[kept].tolist() for row, kept in zip(input_ids.cpu(), keep)]
    if seed is None and temperature > 0:
        seed = int(torch.randint(0, 2**62, ()))
    engine.max_batch_size = max(engine.max_batch_size, len(prompts))  # every row decodes in the same steps
    try:
        out = engine.sample_ids(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                seed=seed, stop_ids=(eos_id,))
    finally:  # no KV cache held while training; and a fresh one next time, so a resumed run computes the same
        engine.free_cache()
    width = max(len(ids) for ids in out.token_ids)
    completion = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    logprobs = torch.zeros((len(prompts), width), dtype=torch.float32)
    for row, (ids, logps) in enumerate(zip(out.token_ids, out.logprobs)):
        completion[row, : len(ids)] = torch.tensor(ids)
        logprobs[row, : len(ids)] = torch.tensor(logps)
    lengths = torch.tensor([len(ids) for ids in out.token_ids])
    completion_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()  # (N, T): up to and with eos
    device = input_ids.device
    completion, completion_mask = completion.to(device), completion_mask.to(device)
    return Rollout(
        sequences=torch.cat([input_ids, completion], dim=1),
        attention_mask=torch.cat([attention_mask, completion_mask.to(attention_mask.dtype)], dim=1),
        completion_mask=completion_mask, logprobs=logprobs.to(device),
        finished=torch.tensor([r == "stop" for r in out.finish_reasons], device=device),
        prompt_len=input_ids.shape[1],
    )


@dataclass
class _Ids:
    """What an engine over a bare policy needs of a tokenizer: its prompts are token ids, nothing is encoded."""

    eos_token_id: int
    pad_token_id: int
    bos_token_id: None = None


@dataclass
class _PolicyEngine:
    engine: Engine
    weights: tuple[int, ...]  # data pointers of the policy's parameters the engine was built over
    shadow: torch.nn.Module | None  # a sharded policy's or another dtype's copy, refilled at every rollout


# One engine per policy (and eos/pad pair, compiled or not, rollout dtype), kept while the policy lives: built once, then every
# rollout reuses its modules, KV cache and per-row state.
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def policy_engine(model: torch.nn.Module, eos_id: int, pad_id: int = 0, compile: bool = False,
                  dtype: torch.dtype | None = None) -> Engine:
    """The Engine that samples `model`'s rollouts: it sees the current weights and never changes the model.

    Its modules are its own (eval mode, decode kernels) over the policy's weight storage (`engine_copy`), so an
    optimizer step, which updates the weights in place, reaches it with no copy. It does not prepack the weights
    for oneDNN: a fused optimizer step leaves no trace the engine could check, so each rollout would re-pack them
    all (a copy as large as the weights), which cost more than it saved at RL batch sizes (bench/rollout.py). The
    one copy on a CPU is the tied output head's transposed weight (vocab x dim, `engine.weight_copy_bytes`),
    rebuilt at each rollout; on a GPU there is none. A policy whose parameters
    were replaced rather than updated (moved, re-assigned) gets a new engine. An FSDP-sharded policy is gathered
    into an unsharded copy on every rank at each rollout (one all-gather per tensor, in the same order on all
    ranks: a full copy of the weights per rank); decoding then needs no collective, so a rank whose rows are
    done never waits on another's. With `compile`, steps of several rows run compiled (`infer/batched.py`, over
    a transposed copy of the body's projections, copied again at every rollout). With a `dtype` other than the
    policy's, the engine runs over a copy of the weights in that dtype, filled again at every rollout (gathered
    into it, for a sharded policy).
    """
    policy = unwrap(model)
    sharded = _sharded(policy)
    policy = plain_model(policy)
    param = next(policy.parameters())
    dtype = param.dtype if dtype is None else dtype
    copied = sharded or dtype != param.dtype
    known = _ENGINES.setdefault(policy, {})
    key = (eos_id, pad_id, compile, dtype)
    built = known.get(key)
    weights = () if sharded else tuple(p.data_ptr() for p in policy.parameters())
    if built is None or built.weights != weights:
        if built is None and dtype != param.dtype:
            warn_if_slow_on_cpu(dtype, param.device, "--rollout-dtype")
        # Building draws random numbers (a fresh model's init, the engine's kernel checks): from a forked RNG,
        # so the run's own stream, which checkpoints save, is the same whether or not this rollout built one.
        with torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else []):
            shadow = _unsharded_copy(policy, dtype) if copied else None
            engine = Engine(shadow if copied else _causal_lm(policy), _Ids(eos_id, pad_id), prepack=False,
                            compile_batched=compile)
        built = known[key] = _PolicyEngine(engine, weights, shadow)
    if copied:
        _gather_into(built.shadow, policy)
    built.engine.refresh_weights()  # a fused optimizer step updates the weights without moving their versions
    return built.engine


def _causal_lm(policy: torch.nn.Module) -> torch.nn.Module:
    """A MiniMind causal LM over the policy's own modules: the policy itself, or for a model holding the trunk and
    head beside other parts (PPO's actor-critic) a causal LM sharing them."""
    if isinstance(policy, MiniMindForCausalLM) or not (hasattr(policy, "model") and hasattr(policy, "lm_head")):
        return policy
    with torch.device("meta"):  # no throwaway weights: the modules are replaced at once
        lm = MiniMindForCausalLM(policy.config)
    lm.model, lm.lm_head = policy.model, policy.lm_head
    return lm


def _unsharded_copy(policy: torch.nn.Module, dtype: torch.dtype) -> MiniMindForCausalLM:
    """A causal LM of the policy's shapes in `dtype`, unsharded on this rank (its values come from
    `_gather_into`)."""
    param = next(policy.parameters())
    lm = MiniMindForCausalLM(policy.config).to(device=param.device, dtype=dtype).requires_grad_(False)
    return lm.eval()


@torch.no_grad()
def _gather_into(shadow: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Copy the policy's current weights into `shadow`, tensor by tensor, in the shadow's dtype (for a sharded
    policy a collective: every rank runs the same all-gathers in the same order, the shadow's)."""
    sharded = policy.state_dict()
    for name, param in shadow.named_parameters():
        value = sharded[name]
        param.copy_(value.full_tensor() if hasattr(value, "full_tensor") else value)


def _sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have sharded the model
        return False
    return isinstance(model, FSDPModule)


def policy_inputs(rollout: Rollout) -> dict:
    """The forward's keywords over a rollout's sequences: the log-probs come straight from the final hidden states
    (`head_loss_fn`, as the forward's `loss`), no (N, T, vocab) logits."""
    return {"input_ids": rollout.sequences, "attention_mask": rollout.attention_mask, "use_cache": False,
            "logits_to_keep": rollout.completion_ids.shape[1] + 1,
            "head_loss_fn": partial(completion_head_logprobs, completion_ids=rollout.completion_ids)}


@torch.no_grad()
def policy_logprobs(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """(N, T) log π(token) of each completion token under `model` in its own dtype (one forward, no grad)."""
    return training_view(model)(**policy_inputs(rollout)).loss


def with_old_logprobs(rollout: Rollout, logp: torch.Tensor) -> Rollout:
    """The rollout with `logp` (N, T) as its old-policy log-probs: detached, float32, 0 where masked."""
    return replace(rollout, logprobs=logp.detach().float() * rollout.completion_mask)


@dataclass
class Scored:
    """A rollout with its decoded completions, rewards (N,) and rule-checked correctness (N,)."""

    rollout: Rollout
    texts: list[str]
    rewards: torch.Tensor
    correct: torch.Tensor


@dataclass
class Experience:
    """One micro-batch's scored rollouts with what the loss needs, kept for the optimizer steps that reuse them
    (`--updates-per-rollout` passes of `--minibatches` steps)."""

    rollout: Rollout
    rewards: torch.Tensor  # (N,)
    ref_logprobs: torch.Tensor  # (N, T) log π_ref of each completion token
    metrics: dict[str, float]  # the rollout numbers logged at every step that trains on it
    extra: dict[str, torch.Tensor]  # the stage's own per-row tensors (N, ...): advantages, old values, returns

    def minibatch(self, index: int, count: int, group_size: int) -> Experience:
        """Minibatch `index` of `count`: whole prompts (their G consecutive rows), in order."""
        if count == 1:
            return self
        rows = self.rewards.shape[0] // count
        assert rows % group_size == 0, "minibatches must hold whole groups"
        part = slice(index * rows, (index + 1) * rows)
        r = self.rollout
        return Experience(Rollout(r.sequences[part], r.attention_mask[part], r.completion_mask[part],
                                  r.logprobs[part], r.finished[part], r.prompt_len),
                          self.rewards[part], self.ref_logprobs[part], self.metrics,
                          {k: v[part] for k, v in self.extra.items()})

    def state(self) -> dict:
        """Tensors and plain containers, for a checkpoint."""
        r = self.rollout
        return {"rollout": {"sequences": r.sequences, "attention_mask": r.attention_mask,
                            "completion_mask": r.completion_mask, "logprobs": r.logprobs, "finished": r.finished,
                            "prompt_len": r.prompt_len},
                "rewards": self.rewards, "ref_logprobs": self.ref_logprobs, "metrics": dict(self.metrics),
                "extra": dict(self.extra)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> Experience:
        """The inverse of `state`, on `device`."""
        r = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state["rollout"].items()}
        return cls(Rollout(**r), state["rewards"].to(device), state["ref_logprobs"].to(device), state["metrics"],
                   {k: v.to(device) for k, v in state["extra"].items()})


class RLObjective(Objective):
    """What GRPO and PPO share: G sampled completions per prompt, scored by a pluggable reward.

    count = prompts in the (mini)batch (each prompt's loss is the mean over its G completions). In eval mode the
    objective answers each prompt once, greedily, and reports its reward and accuracy; its loss is −reward.

    Rollout reuse: the rollouts of a step's micro-batches (an `Experience` each) are made in `prepare` at phase 0
    and trained on for `updates_per_rollout` passes of `minibatches` optimizer steps (phase p trains minibatch
    p mod M); they travel in the checkpoints, so a run stopped mid-reuse resumes exactly.
    """

    def __init__(self, reference: torch.nn.Module, tokenizer, reward: Reward, group_size: int, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, updates_per_rollout: int = 1, minibatches: int = 1,
                 compile_rollouts: bool = False, rollout_dtype: torch.dtype | None = None):
        self.reference, self.tokenizer, self.reward = training_view(reference), tokenizer, reward
        self.group_size, self.max_new_tokens = group_size, max_new_tokens
        self.temperature, self.top_k = temperature, top_k
        self.updates_per_rollout, self.minibatches = updates_per_rollout, minibatches
        self.compile_rollouts = compile_rollouts and compile_allowed()  # MINIMIND_COMPILE=0 keeps rollouts eager
        self.rollout_dtype = rollout_dtype  # None: sample in the policy's own dtype
        self.steps_per_batch = updates_per_rollout * minibatches
        self.buffer: list[Experience] = []  # this rank's micro-batches' experiences, in micro-batch order
        self.phase = 0
        self._current: list[tuple[dict, Experience]] = []  # this step's (batch, experience) pairs

    def count(self, batch: dict) -> torch.Tensor:
        """The number of prompts in the batch's minibatch."""
        return torch.tensor(len(batch["answer"]) // self.minibatches)

    def prepare(self, model: torch.nn.Module, micro: list[dict], phase: int) -> None:
        """Roll out every micro-batch at phase 0 (or when resumed without a buffer); reuse them otherwise."""
        if phase == 0 or len(self.buffer) != len(micro):
            self.buffer = [self.experience(model, batch) for batch in micro]
        self.phase = phase
        self._current = list(zip(micro, self.buffer))

    def experience(self, model: torch.nn.Module, batch: dict) -> Experience:
        """Roll out one micro-batch, score it and run the frozen reference over it; `annotate` adds the stage's
        own tensors (advantages...)."""
        scored = self.roll_out(model, batch, self.group_size, self.temperature)
        rollout = scored.rollout
        with torch.no_grad():
            if self.rescored_by(model) == "sampling":
                rollout = with_old_logprobs(rollout, policy_logprobs(model, rollout))
            ref_logp = self.reference(**self.policy_inputs(rollout)).loss
        found = Experience(rollout, scored.rewards, ref_logp, self.rollout_metrics(scored), {})
        self.annotate(model, found)
        return found

    def annotate(self, model: torch.nn.Module, experience: Experience) -> None:
        """Add the stage's per-row tensors to a fresh experience (in place). Nothing by default."""

    def rescored_by(self, model: torch.nn.Module) -> str | None:
        """Where the old-policy log-probs come from when rollouts are sampled in another dtype than the policy's:
        "sampling", a forward of the policy when the batch is sampled (it is trained on after updates too), or
        "loss", the loss's own forward (one step per rollout batch: on-policy); None: the sampler's own."""
        if self.rollout_dtype is None or self.rollout_dtype == next(unwrap(model).parameters()).dtype:
            return None
        return "sampling" if self.steps_per_batch > 1 else "loss"

    def experience_for(self, model: torch.nn.Module, batch: dict) -> tuple[Experience, bool]:
        """This call's minibatch of the prepared experience of `batch` (or a fresh one, when called outside the
        trainer) and whether it was sampled for this step (phase 0)."""
        for prepared, found in self._current:
            if prepared is batch:
                return found.minibatch(self.phase % self.minibatches, self.minibatches, self.group_size), \
                    self.phase == 0
        return self.experience(model, batch).minibatch(0, self.minibatches, self.group_size), True

    def state_dict(self) -> dict:
        """The rollout buffer, when rollouts are reused (at phase 0 nothing else is needed)."""
        return {"buffer": [e.state() for e in self.buffer]} if self.steps_per_batch > 1 else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore the rollout buffer on the reference model's device."""
        device = next(self.reference.parameters()).device
        self.buffer = [Experience.from_state(e, device) for e in state.get("buffer", [])]

    def policy_inputs(self, rollout: Rollout) -> dict:
        """The forward's keywords over a rollout's sequences (`policy_inputs`)."""
        return policy_inputs(rollout)

    def roll_out(self, model: torch.nn.Module, batch: dict, group_size: int, temperature: float) -> Scored:
        """Sample `group_size` completions per prompt (a prompt's group in consecutive rows), decode, score."""
        ids = batch["input_ids"].repeat_interleave(group_size, dim=0)
        mask = batch["attention_mask"].repeat_interleave(group_size, dim=0)
        answers = [a for a in batch["answer"] for _ in range(group_size)]
        rollout = sample(unwrap(model), ids, mask, self.max_new_tokens, self.tokenizer.eos_token_id,
                         self.tokenizer.pad_token_id, temperature, self.top_k,
                         compile=self.compile_rollouts, dtype=self.rollout_dtype)
        texts = self.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        prompts = [p for p in batch["prompt"] for _ in range(group_size)]
        rewards = self.reward(rollout, texts, answers, prompts).to(ids.device, torch.float32)
        correct = torch.tensor([float(answer_correct(t, a)) for t, a in zip(texts, answers)], device=ids.device)
        return Scored(rollout, texts, rewards, correct)

    def on_policy_pass(self, model: torch.nn.Module, batch: dict):
        """This call's experience (rolled out now, or prepared by the trainer), then the policy's forward (with
        grad) over its sequences.

        -> (experience, the policy's output over the last T + 1 positions, log π and log π_ref of each
        completion token (N, T), whether the experience was sampled for this step).
        """
        found, fresh = self.experience_for(model, batch)
        out = training_view(model)(**self.policy_inputs(found.rollout))
        if self.rescored_by(model) == "loss":
            found = replace(found, rollout=with_old_logprobs(found.rollout, out.loss))
        return found, out, out.loss, found.ref_logprobs, fresh

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        """Greedy answer per prompt: loss_sum = −Σ reward, metrics reward_mean and accuracy."""
        scored = self.roll_out(model, batch, 1, 0.0)
        return LossOutput(-scored.rewards.sum(), 0.0, {
            "reward_mean": scored.rewards.mean().item(), "accuracy": scored.correct.mean().item(),
            "completion_len": scored.rollout.lengths().float().mean().item()})

    def rollout_counts(self, model: torch.nn.Module, rollout: Rollout, sampled: bool = True) -> dict[str, float]:
        """`LossOutput` fields: the policy trains on the sampled sequences (prompt + completion), not the prompts;
        the FLOPs are its training on them and, when they were `sampled` for this step (not reused), the
        reference's forward over them, the sampling that made them, a scoring model's forward when the reward
        runs one and the policy's own when it rescores them (`rescored_by`) (from the shapes alone: no device
        sync), for all M minibatches of the rollout batch. A PPO value head's 6·dim FLOPs per token are left out
        (under 10⁻⁴ of the policy's)."""
        n, width = rollout.sequences.shape
        new = width - rollout.prompt_len
        config = unwrap(model).config
        counts = (n * width, n * new, n * width**2)  # tokens, head at the completion positions, attention pairs
        flops = training_flops(config, *counts)
        scoring = getattr(self.reward, "flops", None)
        if sampled:  # the whole rollout batch was sampled and scored for this step: M minibatches of this shape
            rollout_flops = forward_flops(self.reference.config, *counts) + sampling_flops(config, n,
                                                                                            rollout.prompt_len, new)
            if scoring is not None:
                rollout_flops += scoring(counts)
            if self.rescored_by(model) == "sampling":
                rollout_flops += forward_flops(config, *counts)
            flops += self.minibatches * rollout_flops
        return {"tokens": rollout.sequences.numel(), "useful_tokens": int(rollout.attention_mask.sum()),
                "flops": flops}

    def rollout_metrics(self, scored: Scored) -> dict[str, float]:
        """What every RL step logs about its rollouts."""
        return {"reward_mean": scored.rewards.mean().item(), "reward_std": scored.rewards.std(correction=0).item(),
                "accuracy": scored.correct.mean().item(),
                "completion_len": scored.rollout.lengths().float().mean().item(),
                "rollout_tokens": float(scored.rollout.lengths().sum().item()),
                **getattr(self.reward, "last_terms", {})}  # each term's mean when --reward combines several


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where mask is 1 (over `dim`, or over everything)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)

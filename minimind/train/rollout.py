"""Rollouts for RL (GRPO, PPO): batched sampling with the KV cache, and the objective base that scores them.

Prompts are left-padded so every row's last prompt token sits in the same column; one prefill fills the cache,
then each step feeds one new token per row (positions come from the attention mask, so padded rows count
from 0). Rows stop at eos; the loop ends when all have stopped (on all ranks, for an FSDP-sharded model) or
after `max_new_tokens`. The log-prob of each
sampled token under the policy (temperature-1 softmax, whatever the sampling temperature) is recorded as it is
drawn: these are the "old policy" log-probs of the clipped objectives.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from transformers.cache_utils import DynamicCache

from minimind.info import forward_flops, sampling_flops, training_flops
from minimind.kernels.training import training_view
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
           eos_id: int, pad_id: int = 0, temperature: float = 1.0, top_k: int = 0) -> Rollout:
    """Sample one completion per row of left-padded prompts (temperature 0 = greedy), with a KV cache.

    `model(input_ids, attention_mask, past_key_values, use_cache, logits_to_keep)` must return `.logits`; the
    model is put in eval mode for sampling and restored afterwards.
    """
    was_training = model.training
    model.eval()
    n, prompt_len = input_ids.shape
    cache = DynamicCache()
    mask = attention_mask
    logits = model(input_ids=input_ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits[:, -1]
    done = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
    tokens, logps, alive = [], [], []
    for _ in range(max_new_tokens):
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        token = _pick(logits.float(), temperature, top_k)
        alive.append(~done)
        tokens.append(torch.where(done, torch.full_like(token, pad_id), token))
        logps.append(torch.where(done, torch.zeros(n, device=logits.device),
                                 log_probs.gather(-1, token[:, None]).squeeze(-1)))
        done = done | (token == eos_id)
        if _everyone_done(model, done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=tokens[-1][:, None], attention_mask=mask, past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
    model.train(was_training)
    completion = torch.stack(tokens, dim=1)  # (N, T)
    completion_mask = torch.stack(alive, dim=1).long()
    return Rollout(
        sequences=torch.cat([input_ids, completion], dim=1),
        attention_mask=torch.cat([attention_mask, completion_mask], dim=1),
        completion_mask=completion_mask, logprobs=torch.stack(logps, dim=1), finished=done, prompt_len=prompt_len,
    )


def _everyone_done(model: torch.nn.Module, done: torch.Tensor) -> bool:
    """Every row has stopped — on every rank when the model is FSDP-sharded, since each of its forward passes is
    collective and all ranks must then run the same number of decode steps."""
    finished = done.all()
    if _sharded(model):
        flag = finished.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finished = flag.bool()
    return bool(finished)


def _sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have sharded the model
        return False
    return isinstance(model, FSDPModule)


def _pick(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """One token per row of (N, V) float32 logits: greedy at temperature 0, else drawn from softmax(logits / T)
    restricted to the top k (0: all)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Inverse CDF: one uniform per row against the running sum. `torch.multinomial` draws an exponential
    # per vocabulary entry instead, many times slower on CPU: a large share of a rollout (docs/performance.md).
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum(dim=-1)
    target = torch.rand(probs.shape[0], 1, device=probs.device) * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # first entry whose cdf passes the target
    # A target rounded up to the total would run off the end: take the row's most likely token instead.
    return torch.where(index < probs.shape[-1], index, probs.argmax(-1))


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
                 temperature: float = 1.0, top_k: int = 0, updates_per_rollout: int = 1, minibatches: int = 1):
        self.reference, self.tokenizer, self.reward = training_view(reference), tokenizer, reward
        self.group_size, self.max_new_tokens = group_size, max_new_tokens
        self.temperature, self.top_k = temperature, top_k
        self.updates_per_rollout, self.minibatches = updates_per_rollout, minibatches
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
        with torch.no_grad():
            ref_logp = self.reference(**self.policy_inputs(scored.rollout)).loss
        found = Experience(scored.rollout, scored.rewards, ref_logp, self.rollout_metrics(scored), {})
        self.annotate(model, found)
        return found

    def annotate(self, model: torch.nn.Module, experience: Experience) -> None:
        """Add the stage's per-row tensors to a fresh experience (in place). Nothing by default."""

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
        """The forward's keywords over a rollout's sequences: the log-probs come straight from the final hidden
        states (`head_loss_fn`), no (N, T, vocab) logits."""
        return {"input_ids": rollout.sequences, "attention_mask": rollout.attention_mask, "use_cache": False,
                "logits_to_keep": rollout.completion_ids.shape[1] + 1,
                "head_loss_fn": partial(completion_head_logprobs, completion_ids=rollout.completion_ids)}

    def roll_out(self, model: torch.nn.Module, batch: dict, group_size: int, temperature: float) -> Scored:
        """Sample `group_size` completions per prompt (a prompt's group in consecutive rows), decode, score."""
        ids = batch["input_ids"].repeat_interleave(group_size, dim=0)
        mask = batch["attention_mask"].repeat_interleave(group_size, dim=0)
        answers = [a for a in batch["answer"] for _ in range(group_size)]
        rollout = sample(unwrap(model), ids, mask, self.max_new_tokens, self.tokenizer.eos_token_id,
                         self.tokenizer.pad_token_id, temperature, self.top_k)
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
        reference's forward over them, the sampling that made them and a scoring model's forward when the reward
        runs one (from the shapes alone: no device sync), for all M minibatches of the rollout batch. A PPO
        value head's 6·dim FLOPs per token are left out (under 10⁻⁴ of the policy's)."""
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

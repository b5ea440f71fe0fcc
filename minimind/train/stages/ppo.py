"""`minimind ppo`: Proximal Policy Optimisation with a value head, GAE and a clipped value loss.

    minimind ppo --data rlaif.jsonl --eval-data rlaif_eval.jsonl --init runs/sft --out runs/ppo \
        [--group-size 4 --max-new-tokens 32 --kl-coef 0.05 --gamma 1 --lam 0.95 --vf-coef 0.1 --reward rule]

The critic is a linear value head (dim -> 1, zero-initialised) on the policy's final hidden states, sharing
the transformer trunk (`ActorCritic`). Per completion token t, the reward is −kl_coef·(log π_old − log π_ref)
(a KL penalty against the frozen `--init`), plus the sequence reward on the completion's last token.
Advantages come from GAE(γ, λ) over the old values, whitened over the batch's completion tokens; returns =
advantages + old values. Per token:
    loss_t = −min(ρ_t·A_t, clip(ρ_t, 1 ± ε)·A_t) + vf_coef · ½·max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)
averaged like GRPO (tokens of a completion, then completions of a prompt; count = prompts). `--ppo-epochs K`
(the same as `--updates-per-rollout`) with `--minibatches M`: each rollout batch trains K epochs of M optimiser
steps; V_old then comes from one forward without grad at sampling time, and GAE and whitening run over the whole
rollout batch before it is split. With K = M = 1 (the default) there is one optimiser step per rollout batch,
V_old is the step's own forward, and the clips only bind under dropout. `--value-clip 0` turns the value clip off.
The run directory ends as a model directory (the policy alone) with the value head beside it in
`value_head.safetensors`.

Logged: reward mean/std, accuracy, KL to the reference, policy and value loss, the critic's explained variance
and the clip fraction; with `--eval-data`, greedy held-out reward and accuracy as in `minimind grpo`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minimind.kernels.training import training_view
from minimind.model.modeling_minimind import MiniMindForCausalLM
from minimind.modeldir import load_model_dir, save_model_dir
from minimind.train import rl
from minimind.train.args import TrainConfig, config_from_args
from minimind.train.distributed import DistInfo
from minimind.train.objective import LossOutput
from minimind.train.reference import load_frozen
from minimind.train.rewards import make_reward
from minimind.train.rollout import RLObjective, masked_mean
from minimind.train.stages import run_stage
from minimind.train.trainer import StageRun

DEFAULTS = rl.RL_DEFAULTS


@dataclass
class PPOOptions(rl.RLOptions):
    """The shared RL options plus the KL penalty in the reward, GAE's γ and λ, and the value loss's weight and
    clip range."""

    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    value_clip: float = 0.2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = rl.add_rl_arguments(parser, "ppo", DEFAULTS)
    g.add_argument("--kl-coef", type=float, default=PPOOptions.kl_coef,
                   help="KL-to-reference penalty in the per-token reward")
    g.add_argument("--gamma", type=float, default=PPOOptions.gamma, help="discount γ of GAE")
    g.add_argument("--lam", type=float, default=PPOOptions.lam, help="λ of GAE")
    g.add_argument("--vf-coef", type=float, default=PPOOptions.vf_coef, help="weight of the value loss")
    g.add_argument("--value-clip", type=float, default=PPOOptions.value_clip,
                   help="clip range ε_v of the value update (0: the plain squared error ½(V − R)²)")
    g.add_argument("--ppo-epochs", type=int, dest="updates_per_rollout", metavar="K",
                   default=PPOOptions.updates_per_rollout,
                   help="PPO epochs: passes over each rollout batch (the same setting as --updates-per-rollout)")


def run(args: argparse.Namespace) -> int:
    return run_stage(config_from_args(args, "ppo", PPOOptions.from_args(args)), build)


@dataclass
class ActorCriticOutput:
    logits: torch.Tensor | None  # (B, T', V); None when a head_loss_fn ran instead
    values: torch.Tensor  # (B, T')
    aux_loss: torch.Tensor
    loss: torch.Tensor | None = None  # what head_loss_fn returned


class ActorCritic(nn.Module):
    """The policy's trunk and head plus a value head; parameter names stay the policy's (`model.*`, `lm_head.*`)."""

    def __init__(self, policy: MiniMindForCausalLM):
        super().__init__()
        self.config = policy.config
        self.model, self.lm_head = policy.model, policy.lm_head
        self.value_head = nn.Linear(policy.config.dim, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def policy(self) -> MiniMindForCausalLM:
        """A plain causal LM holding this model's trunk and head (shared, not copied)."""
        with torch.device("meta"):  # no throwaway weights: the modules are replaced at once
            lm = MiniMindForCausalLM(self.config)
        lm.model, lm.lm_head = self.model, self.lm_head
        return lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values=None,
                use_cache: bool = False, logits_to_keep: int = 0, head_loss_fn=None) -> ActorCriticOutput:
        """Logits and values of the last `logits_to_keep` positions (0: all); with `head_loss_fn(hidden, lm_head)`
        (as `MiniMindForCausalLM`), its result over all final hidden states replaces the logits as `loss`."""
        hidden, _, aux = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                    past_key_values=past_key_values, use_cache=use_cache)
        loss = head_loss_fn(hidden, self.lm_head) if head_loss_fn is not None else None
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden) if head_loss_fn is None else None
        return ActorCriticOutput(logits, self.value_head(hidden).squeeze(-1).float(), aux, loss)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (N, T) token rewards/values; the value after a row's end is 0.

    Returns (advantages, returns = advantages + values), zero outside the mask.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_mask = mask[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        next_value = values[:, t + 1] * next_mask if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * next_mask
        advantages[:, t] = running * mask[:, t]
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> torch.Tensor:
    """½·max((V − R)², (V_old + clip(V − V_old, ±clip) − R)²) per token; ½(V − R)² when clip ≤ 0."""
    if clip <= 0:
        return 0.5 * (values - returns) ** 2
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(R − V) / Var(R) over the masked tokens: 0 for a critic that ignores the state, 1 for a perfect one."""

    def var(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, mask)) ** 2, mask)

    return 1.0 - var(returns - values) / var(returns).clamp(min=1e-8)


class PPO(RLObjective):
    """PPO loss over rollouts of an ActorCritic, each reused for `updates_per_rollout` epochs of `minibatches`
    steps; see the module docstring."""

    def __init__(self, reference: torch.nn.Module, tokenizer, reward, options: PPOOptions | None = None):
        """`options`: the rollout, loss and reuse settings (`minimind ppo`'s flags; None: their defaults)."""
        options = options or PPOOptions()
        super().__init__(reference, tokenizer, reward, **options.objective_settings())
        self.kl_coef, self.gamma, self.lam = options.kl_coef, options.gamma, options.lam
        self.vf_coef, self.clip, self.value_clip = options.vf_coef, options.clip, options.value_clip
        self.clip_high = options.clip if options.clip_high is None else options.clip_high

    def annotate(self, model: torch.nn.Module, experience) -> None:
        """With reuse: the critic's values at sampling time (one forward without grad), then GAE advantages and
        returns over the whole rollout batch; with one step per rollout they come from the loss's own forward."""
        if self.steps_per_batch == 1:
            return
        with torch.no_grad():
            values = training_view(model)(**self.policy_inputs(experience.rollout)).values[:, :-1]
        experience.extra["old_values"] = values
        experience.extra["advantages"], experience.extra["returns"] = self.advantages(experience, values)

    @torch.no_grad()
    def advantages(self, experience, old_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(whitened GAE advantages, returns), both (N, T): per-token reward −kl_coef·(log π_old − log π_ref),
        plus the sequence reward on each completion's last token."""
        rollout, mask = experience.rollout, experience.rollout.completion_mask
        token_rewards = -self.kl_coef * (rollout.logprobs - experience.ref_logprobs) * mask
        last = (rollout.lengths() - 1).clamp(min=0)
        token_rewards[torch.arange(len(last), device=last.device), last] += experience.rewards
        advantages, returns = gae(token_rewards, old_values, mask, self.gamma, self.lam)
        return whiten(advantages, mask), returns

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        if not model.training:
            return self.evaluate(model, batch)
        found, out, logp, ref_logp, fresh = self.on_policy_pass(model, batch)  # log-probs (N, T)
        rollout = found.rollout
        values = out.values[:, :-1]  # V of the state before each completion token, (N, T)
        mask = rollout.completion_mask
        if "old_values" in found.extra:
            old_values, advantages, returns = (found.extra[k] for k in ("old_values", "advantages", "returns"))
        else:
            old_values = values.detach()
            advantages, returns = self.advantages(found, old_values)
        kl = (rollout.logprobs - ref_logp) * mask
        policy_loss, clipped = rl.clipped_surrogate(logp, rollout.logprobs, advantages, self.clip, self.clip_high)
        value_loss = clipped_value_loss(values, old_values, returns, self.value_clip)
        per_completion = masked_mean(policy_loss + self.vf_coef * value_loss, mask, dim=-1)
        loss_sum = per_completion.view(-1, self.group_size).mean(-1).sum()
        ratio = torch.exp(logp.detach() - rollout.logprobs)
        metrics = {**found.metrics, "kl": masked_mean(kl, mask).item(),
                   "value_loss": masked_mean(value_loss.detach(), mask).item(),
                   "explained_variance": explained_variance(values.detach(), returns, mask).item(),
                   "policy_loss": masked_mean(policy_loss.detach(), mask).item(),
                   "clip_fraction": masked_mean(clipped.float(), mask).item(),
                   "ratio_mean": masked_mean(ratio, mask).item(),
                   "ratio_max": ratio.masked_fill(mask == 0, 0.0).max().item()}
        return LossOutput(loss_sum, out.aux_loss, metrics, **self.rollout_counts(model, rollout, fresh))


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    options = cfg.stage_options(PPOOptions)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = load_model_dir(cfg.init)
    model = ActorCritic(policy)
    reference = load_frozen(cfg.init, info.device)
    reward = make_reward(options.reward, options.max_new_tokens, policy.config.vocab_size, info.device)
    dataset, eval_dataset, collate = rl.rl_data(cfg, info, tokenizer, options.reward)
    objective = PPO(reference, tokenizer, reward, options)

    def save_final(trained: ActorCritic, out: Path) -> None:
        save_model_dir(trained.policy(), tokenizer, out)
        save_file({k: v.detach().cpu().contiguous() for k, v in trained.value_head.state_dict().items()},
                  str(out / "value_head.safetensors"))

    return StageRun(
        model=model.train(), objective=objective, dataset=dataset, collate=collate, save_final=save_final,
        eval_dataset=eval_dataset,
        final_numbers=rl.held_out_numbers(objective, cfg, eval_dataset, collate, reference, info.device),
        notes=[f"PPO: {options.group_size} completions per prompt (≤ {options.max_new_tokens} tokens), reward "
               f"{options.reward!r}, KL penalty {options.kl_coef:g} in the reward, GAE γ = {options.gamma:g} "
               f"λ = {options.lam:g}, value head on the shared trunk (vf_coef {options.vf_coef:g}), "
               f"{rl.reuse_note(options)}."],
    )

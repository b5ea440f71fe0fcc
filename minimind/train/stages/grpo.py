"""`minimind grpo`: Group Relative Policy Optimisation on prompts with reference answers (rlaif JSONL).

    minimind grpo --data rlaif.jsonl --eval-data rlaif_eval.jsonl --init runs/sft --out runs/grpo \
        [--group-size 4 --max-new-tokens 32 --beta 0.04 --clip 0.2 --reward rule|model:DIR]

Each step: for every prompt sample G completions from the current policy (KV-cached, `--temperature` 1); score them;
advantage A_i = (r_i − mean(r)) / (std(r) + 1e-4) within the prompt's group; then per completion token
    loss_t = −min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε)·A) + β·KL_t,   ρ_t = π(o_t) / π_old(o_t)
with π_old the log-probs recorded while sampling and KL_t the k3 estimator
exp(log π_ref − log π) − (log π_ref − log π) − 1 against the frozen reference (a copy of `--init`). A
completion's loss is the mean over its tokens, a prompt's the mean over its G completions (the GRPO paper's
averaging); the trainer's count is the number of prompts. One optimiser step per rollout batch, so ρ = 1 up to
float noise and dropout: the clip only binds if the policy runs with dropout.

`--max-seq-len` caps the prompt length (longer prompts keep their last tokens); completions add up to
`--max-new-tokens`. Logged: reward mean/std, accuracy (rule exact match), KL, completion length, clip
fraction; with `--eval-data`, the greedy answers' reward and accuracy on held-out prompts (`eval_accuracy`),
and in report.md the held-out accuracy of `--init` and of the trained policy, greedy and sampled (G answers per
prompt at the rollout temperature).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from minimind.errors import UserError
from minimind.modeldir import load_model_dir, save_model_dir
from minimind.train.args import TrainConfig, config_from_args
from minimind.train.distributed import DistInfo
from minimind.train.objective import LossOutput
from minimind.train.reference import load_frozen
from minimind.train.rewards import make_reward
from minimind.train.rl import (
    RL_DEFAULTS,
    RLOptions,
    add_rl_arguments,
    clipped_surrogate,
    held_out_numbers,
    rl_data,
)
from minimind.train.rollout import RLObjective, masked_mean
from minimind.train.stages import run_stage
from minimind.train.trainer import StageRun

DEFAULTS = RL_DEFAULTS


@dataclass
class GRPOOptions(RLOptions):
    """The shared RL options plus β, the weight of the k3 KL to the reference."""

    beta: float = 0.04


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = add_rl_arguments(parser, "grpo", DEFAULTS)
    g.add_argument("--beta", type=float, default=GRPOOptions.beta, help="weight of the KL-to-reference penalty")


def run(args: argparse.Namespace) -> int:
    if args.group_size < 2:
        raise UserError(f"--group-size must be at least 2 for group-normalised advantages, got {args.group_size}")
    return run_stage(config_from_args(args, "grpo", GRPOOptions.from_args(args)), build)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards of consecutive groups of G -> (r − group mean) / (group std + eps), (N,)."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(-1, keepdim=True), groups.std(-1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(π ‖ π_ref) per sampled token: e^{ref − logp} − (ref − logp) − 1 (≥ 0, unbiased)."""
    diff = ref_logp - logp
    return torch.exp(diff) - diff - 1.0


class GRPO(RLObjective):
    """GRPO loss over fresh rollouts; see the module docstring for the exact formula and averaging."""

    def __init__(self, reference: torch.nn.Module, tokenizer, reward, group_size: int = 4, max_new_tokens: int = 32,
                 beta: float = 0.04, clip: float = 0.2, temperature: float = 1.0, top_k: int = 0):
        super().__init__(reference, tokenizer, reward, group_size, max_new_tokens, temperature, top_k)
        self.beta, self.clip = beta, clip

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        if not model.training:
            return self.evaluate(model, batch)
        scored, out, logp, ref_logp = self.on_policy_pass(model, batch)  # log-probs (N, T)
        rollout = scored.rollout
        advantages = group_advantages(scored.rewards, self.group_size)[:, None]
        policy_loss, clipped = clipped_surrogate(logp, rollout.logprobs, advantages, self.clip)
        kl = k3_kl(logp, ref_logp)
        mask = rollout.completion_mask
        per_completion = masked_mean(policy_loss + self.beta * kl, mask, dim=-1)  # (N,)
        loss_sum = per_completion.view(-1, self.group_size).mean(-1).sum()
        metrics = {**self.rollout_metrics(scored), "kl": masked_mean(kl.detach(), mask).item(),
                   "clip_fraction": masked_mean(clipped.float(), mask).item()}
        return LossOutput(loss_sum, out.aux_loss, metrics, **self.rollout_counts(model, rollout))


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    options = cfg.stage_options(GRPOOptions)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_dir(cfg.init)
    reference = load_frozen(cfg.init, info.device)
    reward = make_reward(options.reward, options.max_new_tokens, model.config.vocab_size, info.device)
    dataset, eval_dataset, collate = rl_data(cfg, info, tokenizer, options.reward)
    objective = GRPO(reference, tokenizer, reward, options.group_size, options.max_new_tokens, options.beta,
                     options.clip, options.temperature, options.top_k)
    return StageRun(
        model=model.train(), objective=objective, dataset=dataset, collate=collate,
        save_final=lambda m, out: save_model_dir(m, tokenizer, out), eval_dataset=eval_dataset,
        final_numbers=held_out_numbers(objective, cfg, eval_dataset, collate, reference, info.device),
        notes=[f"GRPO: G = {options.group_size} completions per prompt (≤ {options.max_new_tokens} tokens, "
               f"temperature {options.temperature:g}), reward {options.reward!r}, β = {options.beta:g} (k3 KL to "
               f"{cfg.init}), clip ε = {options.clip:g}, one optimiser step per rollout. Held-out numbers: "
               "greedy answers, and G sampled answers per prompt at the rollout temperature."],
    )

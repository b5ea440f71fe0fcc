"""`minimind grpo`: Group Relative Policy Optimisation on prompts with reference answers (rlaif JSONL).

    minimind grpo --data rlaif.jsonl --eval-data rlaif_eval.jsonl --init runs/sft --out runs/grpo \
        [--group-size 4 --max-new-tokens 32 --beta 0.04 --clip 0.2 --reward rule|model:DIR]

Each step: for every prompt sample G completions from the current policy (KV-cached, `--temperature` 1); score them;
advantage A_i = (r_i − mean(r)) / (std(r) + 1e-4) within the prompt's group; then per completion token
    loss_t = −min(ρ_t·A, clip(ρ_t, 1 − ε, 1 + ε)·A) + β·KL_t,   ρ_t = π(o_t) / π_old(o_t)
with π_old the log-probs recorded while sampling and KL_t the k3 estimator
exp(log π_ref − log π) − (log π_ref − log π) − 1 against the frozen reference (a copy of `--init`). A
completion's loss is the mean over its tokens, a prompt's the mean over its G completions (the GRPO paper's
averaging); the trainer's count is the number of prompts. `--loss bnpo | dr_grpo | dapo | cispo` change the
averaging (and, for cispo, the token term), `--clip-high` the upper clip bound, `--importance-sampling sequence`
the ratio, `--kl-estimator` the KL term: `minimind/train/policy_loss.py` has them all.

By default one optimiser step per rollout batch, so ρ = 1 up to float noise and dropout. With
`--updates-per-rollout K --minibatches M` each rollout batch trains K passes of M optimiser steps (each on 1/M of
its prompts, advantages computed over the whole batch first): π_old stays the sampling policy, so ρ moves away
from 1 and the clip binds.

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
from minimind.train.policy_loss import (
    IMPORTANCE_SAMPLING,
    KL_ESTIMATORS,
    LOSSES,
    TOKEN_COUNTED,
    kl_estimate,
    policy_loss,
)
from minimind.train.reference import load_frozen
from minimind.train.rewards import make_reward
from minimind.train.rl import (
    RL_DEFAULTS,
    RLOptions,
    add_rl_arguments,
    clipped_surrogate,  # noqa: F401 - callers import the surrogate from here
    held_out_numbers,
    reuse_note,
    rl_data,
)
from minimind.train.rollout import RLObjective, masked_mean
from minimind.train.stages import run_stage
from minimind.train.trainer import StageRun

DEFAULTS = RL_DEFAULTS


@dataclass
class GRPOOptions(RLOptions):
    """The shared RL options plus β (the weight of the KL to the reference), the loss variant, its importance
    sampling level and KL estimator."""

    beta: float = 0.04
    loss: str = "grpo"  # grpo | bnpo | dr_grpo | dapo | cispo (minimind/train/policy_loss.py)
    importance_sampling: str = "token"  # token | sequence (GSPO)
    kl_estimator: str = "k3"  # k1 | k2 | k3

    def resolved_clip_high(self) -> float:
        """ε_high: --clip-high, else --clip; for cispo (where 1 + ε_high caps the IS weight) 4, the reference
        project's cap of 5."""
        if self.clip_high is not None:
            return self.clip_high
        return CISPO_CLIP_HIGH if self.loss == "cispo" else self.clip


CISPO_CLIP_HIGH = 4.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = add_rl_arguments(parser, "grpo", DEFAULTS)
    g.add_argument("--beta", type=float, default=GRPOOptions.beta, help="weight of the KL-to-reference penalty")
    choices = (
        ("--loss", LOSSES, GRPOOptions.loss,
         "how the token losses are formed and averaged: grpo (mean of each completion's token mean), bnpo (token "
         "mean of the batch), dr_grpo (token sum / (completions x --max-new-tokens)), dapo (token sum / tokens of "
         "the whole step), cispo (the capped IS weight, detached, times the log-prob, averaged as dapo); "
         "docs/rl.md has the formulas"),
        ("--importance-sampling", IMPORTANCE_SAMPLING, GRPOOptions.importance_sampling,
         "the ratio π/π_old per token, or per completion as the exp of its tokens' mean log-ratio (sequence: GSPO)"),
        ("--kl-estimator", KL_ESTIMATORS, GRPOOptions.kl_estimator,
         "estimator of KL(π‖π_ref) per sampled token: k1 = log π/π_ref, k2 = ½(log π/π_ref)², "
         "k3 = π_ref/π − log(π_ref/π) − 1"),
    )
    for flag, allowed, default, text in choices:
        g.add_argument(flag, choices=allowed, default=default, help=text)


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
    return kl_estimate(logp, ref_logp, "k3")


class GRPO(RLObjective):
    """GRPO-family loss over rollouts, each reused for `updates_per_rollout` passes of `minibatches` steps; see
    the module docstring and `policy_loss.py` for the formulas and averaging."""

    def __init__(self, reference: torch.nn.Module, tokenizer, reward, options: GRPOOptions | None = None):
        """`options`: the rollout, loss and reuse settings (`minimind grpo`'s flags; None: their defaults)."""
        options = options or GRPOOptions()
        super().__init__(reference, tokenizer, reward, **options.objective_settings())
        self.beta, self.clip, self.clip_high = options.beta, options.clip, options.resolved_clip_high()
        self.loss, self.importance_sampling = options.loss, options.importance_sampling
        self.kl_estimator = options.kl_estimator

    def count(self, batch: dict) -> torch.Tensor:
        """Prompts of the minibatch; for dapo and cispo its completion tokens (the trainer sums them over the
        step's micro-batches and ranks, so those losses are token means over the whole step)."""
        if self.loss in TOKEN_COUNTED:
            for prepared, found in self._current:
                if prepared is batch:
                    part = found.minibatch(self.phase % self.minibatches, self.minibatches, self.group_size)
                    return part.rollout.completion_mask.sum().cpu()
        return super().count(batch)

    def annotate(self, model: torch.nn.Module, experience) -> None:
        """Group-normalised advantages over the whole rollout (before any minibatch split), (N,)."""
        experience.extra["advantages"] = group_advantages(experience.rewards, self.group_size)

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        if not model.training:
            return self.evaluate(model, batch)
        found, out, logp, ref_logp, fresh = self.on_policy_pass(model, batch)  # log-probs (N, T)
        rollout, mask = found.rollout, found.rollout.completion_mask
        part = policy_loss(logp, rollout.logprobs, ref_logp, found.extra["advantages"], mask, self.group_size,
                           self.max_new_tokens, self.loss, self.beta, self.clip, self.clip_high,
                           self.importance_sampling, self.kl_estimator)
        ratio = part.ratio.expand_as(logp)
        metrics = {**found.metrics, "kl": masked_mean(part.kl, mask).item(),
                   "clip_fraction": masked_mean(part.clipped.expand_as(logp).float(), mask).item(),
                   "ratio_mean": masked_mean(ratio, mask).item(),
                   "ratio_max": ratio.masked_fill(mask == 0, 0.0).max().item()}
        return LossOutput(part.loss_sum, out.aux_loss, metrics, **self.rollout_counts(model, rollout, fresh))


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    options = cfg.stage_options(GRPOOptions)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_dir(cfg.init)
    reference = load_frozen(cfg.init, info.device)
    reward = make_reward(options.reward, options.max_new_tokens, model.config.vocab_size, info.device)
    dataset, eval_dataset, collate = rl_data(cfg, info, tokenizer, options.reward)
    objective = GRPO(reference, tokenizer, reward, options)
    return StageRun(
        model=model.train(), objective=objective, dataset=dataset, collate=collate,
        save_final=lambda m, out: save_model_dir(m, tokenizer, out), eval_dataset=eval_dataset,
        final_numbers=held_out_numbers(objective, cfg, eval_dataset, collate, reference, info.device),
        notes=[f"GRPO: G = {options.group_size} completions per prompt (≤ {options.max_new_tokens} tokens, "
               f"temperature {options.temperature:g}), reward {options.reward!r}, β = {options.beta:g} (KL to "
               f"{cfg.init}), loss {options.loss} (clip ε = {options.clip:g}, ε_high = {options.resolved_clip_high():g}, "
               f"{options.importance_sampling}-level ratio, KL {options.kl_estimator}), {reuse_note(options)}. "
               "Held-out numbers: "
               "greedy answers, and G sampled answers per prompt at the rollout temperature."],
    )

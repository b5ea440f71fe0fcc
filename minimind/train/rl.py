"""What the RL stages (`minimind grpo`, `minimind ppo`) share: their flags and options, the prompt data, the
clipped policy surrogate, and the held-out numbers of report.md. The rollouts and the RL objective's common
steps are in `rollout.py`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from minimind.data.datasets import PromptDataset
from minimind.device import dtype_name
from minimind.errors import UserError
from minimind.train.args import OptionsT, StageOptions, TrainConfig, add_common_arguments
from minimind.train.distributed import DTYPES, DistInfo
from minimind.train.rollout import RLObjective, prompt_batch
from minimind.train.stages import stage_data

# RL fine-tunes a trained policy gently: small lr, no warmup, no weight decay; max_seq_len caps prompt length.
RL_DEFAULTS = {"lr": 1e-5, "warmup_steps": 0, "weight_decay": 0.0, "batch_size": 8, "max_seq_len": 256,
               "epochs": 1, "eval_batches": 10}


@dataclass
class RLOptions(StageOptions):
    """The rollout and reward settings GRPO and PPO share; each stage adds its own."""

    group_size: int = 4  # completions sampled per prompt (G)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    reward: str = "rule"  # rule | exact | model:DIR | rm:DIR | FILE.py:FUNCTION, several joined by commas
    clip: float = 0.2  # ratio clip range ε (the low side, and the high side unless clip_high is given)
    clip_high: float | None = None  # ε_high of the upper clip bound 1 + ε_high; None: the stage's default
    updates_per_rollout: int = 1  # passes over each rollout batch (K; TRL's num_iterations, PPO's epochs)
    minibatches: int = 1  # optimizer steps per pass, each on 1/M of the rollout batch's prompts
    compile_rollouts: bool = False  # decode rollout steps of 2+ rows through a compiled step (infer/batched.py)
    rollout_dtype: str | None = None  # fp32 | bf16 | fp16: sample through a weight copy in it; None: the policy's

    @classmethod
    def from_args(cls: type[OptionsT], args: argparse.Namespace, **parsed: Any) -> OptionsT:
        """The options from the flags, checked: a completion needs at least one new token; each minibatch holds
        whole prompts."""
        if args.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        if args.updates_per_rollout < 1:
            raise UserError(f"--updates-per-rollout must be at least 1, got {args.updates_per_rollout}")
        if args.minibatches < 1 or args.batch_size % args.minibatches:
            raise UserError(f"--minibatches must divide --batch-size ({args.batch_size} prompts per micro-batch) "
                            f"into whole prompts, got {args.minibatches}")
        if args.clip_high is not None and args.clip_high < 0:
            raise UserError(f"--clip-high must be at least 0, got {args.clip_high}")
        return super().from_args(args, **parsed)

    def objective_settings(self) -> dict[str, Any]:
        """The `RLObjective` keyword arguments these options set: rollout size, sampling and rollout reuse."""
        return {"group_size": self.group_size, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_k": self.top_k,
                "updates_per_rollout": self.updates_per_rollout, "minibatches": self.minibatches,
                "compile_rollouts": self.compile_rollouts,
                "rollout_dtype": None if self.rollout_dtype is None else DTYPES[self.rollout_dtype]}


class _AddReward(argparse.Action):
    """`--reward` given again adds a term (joined with commas) instead of replacing the first."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, "_rewards_given", False)
        namespace.reward = f"{namespace.reward},{values}" if given else values
        namespace._rewards_given = True


def add_rl_arguments(parser: argparse.ArgumentParser, stage: str, defaults: dict) -> argparse._ArgumentGroup:
    """Flags GRPO and PPO share (rollout and reward); returns the group for stage-specific additions."""
    add_common_arguments(parser, stage, defaults)
    g = parser.add_argument_group("rollouts and reward")
    g.add_argument("--group-size", type=int, default=RLOptions.group_size, help="completions sampled per prompt (G)")
    g.add_argument("--max-new-tokens", type=int, default=RLOptions.max_new_tokens, help="longest completion sampled")
    g.add_argument("--temperature", type=float, default=RLOptions.temperature, help="sampling temperature of rollouts")
    g.add_argument("--top-k", type=int, default=RLOptions.top_k, help="sample only from the k likeliest tokens (0 = off)")
    g.add_argument("--reward", default=RLOptions.reward, action=_AddReward,
                   help="'rule' (exact answer + format + length), 'exact' (1 if the answer is right, else 0), "
                        "'model:DIR' (mean log-prob under DIR), 'rm:DIR' (a sequence-classification reward model "
                        "with its own tokenizer) or 'FILE.py:FUNCTION' (your function of prompts, completions, "
                        "answers); repeat the flag or use commas to add several, a weight after '@' "
                        "(--reward exact --reward my.py:brevity@0.5)")
    g.add_argument("--clip", type=float, default=RLOptions.clip,
                   help="ratio clip range ε: the ratio is kept in [1 − ε, 1 + ε_high]")
    g.add_argument("--clip-high", type=float, default=None,
                   help="ε_high of the upper bound (DAPO's clip-higher; default --clip; for --loss cispo the cap "
                        "1 + ε_high of the importance weight, default 4)")
    g.add_argument("--updates-per-rollout", type=int, default=RLOptions.updates_per_rollout, metavar="K",
                   help="passes over each rollout batch before sampling again (TRL's num_iterations); with "
                        "--minibatches M each pass is M optimizer steps")
    g.add_argument("--minibatches", type=int, default=RLOptions.minibatches, metavar="M",
                   help="optimizer steps per pass over a rollout batch, each on 1/M of its prompts (must divide "
                        "--batch-size); a rollout batch trains updates-per-rollout x minibatches steps")
    g.add_argument("--compile-rollouts", action="store_true",
                   help="decode rollouts through a compiled batched step (compiled once per run: 10-110 s on 2 "
                        "CPU cores; the same tokens and log-probs up to float rounding). Off by default: at the "
                        "demo's sizes the compilation costs more than it saves (docs/rl.md); it can pay for long "
                        "runs with long completions. MINIMIND_COMPILE=0 keeps it off")
    g.add_argument("--no-compile-rollouts", dest="compile_rollouts", action="store_false",
                   help="decode rollouts eagerly (the default)")
    g.add_argument("--rollout-dtype", type=dtype_name, choices=list(DTYPES), default=None,
                   help="sample rollouts through a copy of the weights in this dtype, refreshed every rollout "
                        "(default: the policy's own); the old-policy log-probs then come from the policy in its "
                        "own dtype: the loss's own forward, or one more forward per rollout batch when rollouts "
                        "are reused. For an fp32 run on a CPU with bf16 instructions (AVX-512 BF16, AMX), bf16 "
                        "samples faster (docs/rl.md); under --dtype bf16 rollouts already run in autocast")
    return g


def reuse_note(options: RLOptions) -> str:
    """How the run uses each rollout batch, for report.md."""
    steps = options.updates_per_rollout * options.minibatches
    if steps == 1:
        return "one optimiser step per rollout batch"
    return (f"each rollout batch trained for {options.updates_per_rollout} pass(es) of {options.minibatches} "
            f"minibatch step(s) ({steps} optimiser steps)")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip: float, clip_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ρA, clip(ρ, 1 − ε, 1 + ε_high)A) and whether the clip bound; advantages broadcast against
    (N, T); ε_high defaults to ε."""
    ratio = torch.exp(logp - old_logp)
    high = clip if clip_high is None else clip_high
    unclipped, clipped = ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def rl_data(cfg: TrainConfig, info: DistInfo, tokenizer, reward: str):
    """(train, eval or None) prompt datasets and their collate function; `reward` is --reward, for the warning
    about prompts without a reference answer."""
    dataset = PromptDataset(stage_data(cfg, info, cfg.data, cfg.init, "rlaif"), cfg.max_seq_len)
    unanswered = dataset.unanswered() if reward in ("rule", "exact") and info.is_main else 0
    if unanswered:
        print(f"warning: {cfg.data}: {unanswered} of {len(dataset)} prompts have no reference answer; the "
              f"{reward!r} reward can only score their format, length and repetition (accuracy is 0 "
              "for them). For open-ended prompts pass --reward model:DIR.", flush=True)
    eval_dataset = None
    if cfg.eval_data:
        eval_dataset = PromptDataset(stage_data(cfg, info, cfg.eval_data, cfg.init, "rlaif"), cfg.max_seq_len)

    def collate(items: list[dict]) -> dict:
        return prompt_batch(items, tokenizer.pad_token_id)

    return dataset, eval_dataset, collate


def held_out_numbers(objective: RLObjective, cfg: TrainConfig, eval_dataset, collate: Callable,
                     start: torch.nn.Module, device: torch.device) -> Callable[[torch.nn.Module], dict]:
    """For report.md: held-out accuracy and reward of `--init` (`start`) and of the trained policy.

    Two views: greedy answers (what a user sees at temperature 0) and G sampled answers per prompt at the rollout
    temperature (the reward the RL objective itself maximises). Sampling is seeded the same for both models, in
    a forked RNG so the training stream is untouched.
    """

    @torch.no_grad()
    def score(model: torch.nn.Module, sampled: bool) -> tuple[float, float]:
        loader = DataLoader(eval_dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
        correct = reward = answers = 0.0
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            for i, batch in enumerate(loader):
                if i >= cfg.eval_batches:
                    break
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if sampled:
                    scored = objective.roll_out(model, batch, objective.group_size, objective.temperature)
                else:
                    scored = objective.roll_out(model, batch, 1, 0.0)
                correct += scored.correct.sum().item()
                reward += scored.rewards.sum().item()
                answers += len(scored.texts)
        model.train(was_training)
        return correct / max(answers, 1.0), reward / max(answers, 1.0)

    def numbers(trained: torch.nn.Module) -> dict:
        if eval_dataset is None:
            return {}
        result = {}
        for view, sampled in (("greedy", False), (f"sampled T={objective.temperature:g}", True)):
            for name, model in (("--init", start), ("trained", trained)):
                acc, reward = score(model, sampled)
                result[f"held-out accuracy ({view}): {name}"] = acc
                result[f"held-out reward ({view}): {name}"] = reward
        return result

    return numbers

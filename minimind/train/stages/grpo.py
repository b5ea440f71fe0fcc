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
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from minimind.data.datasets import PromptDataset
from minimind.errors import UserError
from minimind.modeldir import load_model_dir, save_model_dir
from minimind.train.args import TrainConfig, add_common_arguments, config_from_args
from minimind.train.distributed import DistInfo
from minimind.train.objective import LossOutput
from minimind.train.reference import load_frozen
from minimind.train.rewards import make_reward
from minimind.train.rollout import RLObjective, masked_mean, prompt_batch
from minimind.train.stages import run_stage, stage_data
from minimind.train.trainer import StageRun

# RL fine-tunes a trained policy gently: small lr, no warmup, no weight decay; max_seq_len caps prompt length.
DEFAULTS = {"lr": 1e-5, "warmup_steps": 0, "weight_decay": 0.0, "batch_size": 8, "max_seq_len": 256,
            "epochs": 1, "eval_batches": 10}


def add_rl_arguments(parser: argparse.ArgumentParser, stage: str, defaults: dict) -> argparse._ArgumentGroup:
    """Flags GRPO and PPO share (rollout and reward); returns the group for stage-specific additions."""
    add_common_arguments(parser, stage, defaults)
    g = parser.add_argument_group("rollouts and reward")
    g.add_argument("--group-size", type=int, default=4, help="completions sampled per prompt (G)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="longest completion sampled")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts")
    g.add_argument("--top-k", type=int, default=0, help="sample only from the k likeliest tokens (0 = off)")
    g.add_argument("--reward", default="rule",
                   help="'rule' (exact answer + format + length), 'exact' (1 if the answer is right, else 0) or "
                        "'model:DIR' (mean log-prob under DIR)")
    g.add_argument("--clip", type=float, default=0.2, help="ratio clip range ε")
    return g


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = add_rl_arguments(parser, "grpo", DEFAULTS)
    g.add_argument("--beta", type=float, default=0.04, help="weight of the KL-to-reference penalty")


def rl_settings(args: argparse.Namespace) -> dict:
    """The shared RL flags, checked, as the `extra` settings of the TrainConfig."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    return {"group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_k": args.top_k, "reward": args.reward, "clip": args.clip}


def run(args: argparse.Namespace) -> int:
    if args.group_size < 2:
        raise UserError(f"--group-size must be at least 2 for group-normalised advantages, got {args.group_size}")
    return run_stage(config_from_args(args, "grpo", beta=args.beta, **rl_settings(args)), build)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(N,) rewards of consecutive groups of G -> (r − group mean) / (group std + eps), (N,)."""
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(-1, keepdim=True), groups.std(-1, keepdim=True)
    return ((groups - mean) / (std + eps)).view(-1)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ρA, clip(ρ)A) and whether the clip bound; advantages broadcast against (N, T)."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


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


def rl_data(cfg: TrainConfig, info: DistInfo, tokenizer):
    """(train, eval or None) prompt datasets and their collate function."""
    dataset = PromptDataset(stage_data(cfg, info, cfg.data, cfg.init, "rlaif"), cfg.max_seq_len)
    unanswered = dataset.unanswered() if cfg.extra["reward"] in ("rule", "exact") and info.is_main else 0
    if unanswered:
        print(f"warning: {cfg.data}: {unanswered} of {len(dataset)} prompts have no reference answer; the "
              f"{cfg.extra['reward']!r} reward can only score their format, length and repetition (accuracy is 0 "
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


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    extra = cfg.extra
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_dir(cfg.init)
    reference = load_frozen(cfg.init, info.device)
    reward = make_reward(extra["reward"], extra["max_new_tokens"], model.config.vocab_size, info.device)
    dataset, eval_dataset, collate = rl_data(cfg, info, tokenizer)
    objective = GRPO(reference, tokenizer, reward, extra["group_size"], extra["max_new_tokens"], extra["beta"],
                     extra["clip"], extra["temperature"], extra["top_k"])
    return StageRun(
        model=model.train(), objective=objective, dataset=dataset, collate=collate,
        save_final=lambda m, out: save_model_dir(m, tokenizer, out), eval_dataset=eval_dataset,
        final_numbers=held_out_numbers(objective, cfg, eval_dataset, collate, reference, info.device),
        notes=[f"GRPO: G = {extra['group_size']} completions per prompt (≤ {extra['max_new_tokens']} tokens, "
               f"temperature {extra['temperature']:g}), reward {extra['reward']!r}, β = {extra['beta']:g} (k3 KL to "
               f"{cfg.init}), clip ε = {extra['clip']:g}, one optimiser step per rollout. Held-out numbers: "
               "greedy answers, and G sampled answers per prompt at the rollout temperature."],
    )

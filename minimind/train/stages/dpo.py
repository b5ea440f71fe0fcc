"""`minimind dpo`: direct preference optimisation on `{"chosen", "rejected"}` pairs against a frozen reference.

    minimind dpo --data dpo.jsonl --init runs/sft --out runs/dpo [--beta 0.1]

Chosen rows then rejected rows go through the policy in ONE forward (as the reference project does), and through the frozen
reference (a copy of `--init`) under no_grad. A sequence's log-probability is the MEAN log-prob of its assistant
tokens (MiniMind2's convention, `--logp mean`; `--logp sum` gives the DPO paper's / TRL's summed form). With
s = the sequence log-prob:

    loss = −log σ(β·((s_policy(c) − s_policy(r)) − (s_ref(c) − s_ref(r))))

The implicit rewards are β·(s_policy − s_ref); the run logs their mean for chosen and rejected replies, the
margin between them and the fraction of pairs with a positive margin (accuracy), on training and eval batches.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minimind.data.datasets import PairDataset, pair_collate
from minimind.info import forward_flops
from minimind.kernels.training import training_view
from minimind.modeldir import load_model_dir, save_model_dir
from minimind.train.args import StageOptions, TrainConfig, add_common_arguments, config_from_args
from minimind.train.distributed import DistInfo
from minimind.train.objective import LossOutput, Objective, model_inputs
from minimind.train.reference import load_frozen
from minimind.train.stages import run_stage, stage_data
from minimind.train.trainer import StageRun

# The reference project's DPO settings: lr 1e-4, clip 0.5, no weight decay.
DEFAULTS = {"lr": 1e-4, "grad_clip": 0.5, "weight_decay": 0.0, "warmup_steps": 10, "batch_size": 8,
            "max_seq_len": 512, "epochs": 1}


@dataclass
class DPOOptions(StageOptions):
    """β and the sequence log-prob convention ("mean" or "sum" of the reply's token log-probs)."""

    beta: float = 0.1
    logp: str = "mean"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "dpo", DEFAULTS)
    g = parser.add_argument_group("DPO")
    g.add_argument("--beta", type=float, default=0.1, help="β: strength of the preference (inverse KL weight)")
    g.add_argument("--logp", choices=["mean", "sum"], default="mean",
                   help="sequence log-prob = mean (seed) or sum (DPO paper, TRL) of the reply's token log-probs")


def run(args: argparse.Namespace) -> int:
    return run_stage(config_from_args(args, "dpo", DPOOptions.from_args(args)), build)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards β·(policy − ref) of chosen and rejected, all (N,)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


class DPO(Objective):
    """Batch = N chosen rows then N rejected rows (`pair_collate`); count = N pairs."""

    def __init__(self, reference: torch.nn.Module, beta: float = 0.1, mean_logp: bool = True):
        self.reference, self.beta, self.mean_logp = training_view(reference), beta, mean_logp

    def _sequence(self, total: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Σ mask · log p per row -> the sequence log-prob: that sum, or its mean over the mask."""
        return total / mask.sum(-1).clamp(min=1.0) if self.mean_logp else total

    def count(self, batch: dict) -> torch.Tensor:
        """The number of pairs."""
        return torch.tensor(batch["input_ids"].shape[0] // 2)

    def frozen_flops(self, counts: tuple[int, int, int]) -> float:
        """The reference's forward over the same rows (the head at loss positions)."""
        return forward_flops(self.reference.config, *counts)

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        inputs = model_inputs(batch)
        labels, mask = batch["labels"], batch["loss_mask"]
        # Σ mask · log p per row straight from the hidden states: the (rows x tokens x vocab) logits of policy
        # and reference are never materialised, and on CPU prompt positions skip the output head.
        out = training_view(model)(**inputs, targets=labels, target_weights=mask, per_row=True)
        policy = self._sequence(-out.loss, mask)
        with torch.no_grad():
            ref = self._sequence(-self.reference(**inputs, targets=labels, target_weights=mask, per_row=True).loss,
                                 mask)
        n = policy.shape[0] // 2
        losses, chosen, rejected = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta)
        margin = (chosen - rejected).detach()
        metrics = {
            "reward_margin": margin.mean().item(), "reward_accuracy": (margin > 0).float().mean().item(),
            "chosen_reward": chosen.mean().item(), "rejected_reward": rejected.mean().item(),
            "chosen_logp": policy[:n].mean().item(), "rejected_logp": policy[n:].mean().item(),
        }
        return LossOutput(losses.sum(), out.aux_loss, metrics)


def build(cfg: TrainConfig, info: DistInfo) -> StageRun:
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model_dir(cfg.init)
    model.config.max_seq_len = max(model.config.max_seq_len, cfg.max_seq_len)
    reference = load_frozen(cfg.init, info.device)
    dataset = PairDataset(stage_data(cfg, info, cfg.data, cfg.init, "dpo"), cfg.max_seq_len)
    eval_dataset = None
    if cfg.eval_data:
        eval_dataset = PairDataset(stage_data(cfg, info, cfg.eval_data, cfg.init, "dpo"), cfg.max_seq_len)
    options = cfg.stage_options(DPOOptions)
    convention = "mean" if options.logp == "mean" else "sum"
    return StageRun(
        model=model.train(), objective=DPO(reference, options.beta, convention == "mean"), dataset=dataset,
        collate=pair_collate, save_final=lambda m, out: save_model_dir(m, tokenizer, out), eval_dataset=eval_dataset,
        notes=[f"DPO with β = {options.beta:g} against a frozen copy of {cfg.init}; sequence log-prob = "
               f"{convention} of the reply's token log-probs; chosen and rejected in one forward. Rewards are "
               "β·(log π − log π_ref); margin = chosen − rejected reward, accuracy = share of pairs with margin > 0."],
    )

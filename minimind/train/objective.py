"""What a stage optimises: an Objective turns a batch into a summed loss; the trainer does everything else.

The trainer normalises by the *global* count of targets in an optimizer step (summed over micro-batches
and ranks) before backward, so accumulation and data parallelism give the same gradient as one big batch.
For token losses that count is Σ loss_mask (MiniMind2's Σ(ce·mask)/Σmask, taken over the whole step); for
pair losses (DPO) it is the number of pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from minimind.kernels.training import training_view


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # summed over this micro-batch's targets; divided by the step's total by the trainer
    aux_loss: torch.Tensor | float = 0.0  # MoE load balancing, averaged over micro-batches
    metrics: dict[str, float] = field(default_factory=dict)  # extra numbers to log (averaged per step)
    # Tokens this call trained on, and how many were not padding, when that is not the batch's input_ids
    # (RL trains on the sequences it sampled); they make the logged tokens/s, nonpad_fraction and MFU.
    tokens: int | None = None
    useful_tokens: int | None = None
    # The FLOPs this call ran, frozen models and sampling included, when the batch cannot say (RL: set with
    # `tokens`); for `mfu`.
    flops: float | None = None


class Objective:
    """Base class: `count(batch)` targets in a batch; `__call__(model, batch)` -> LossOutput.

    An objective that trains several optimizer steps on one fetched batch (RL reusing its rollouts) sets
    `steps_per_batch`: the trainer then fetches new micro-batches every `steps_per_batch` steps and, before
    counting, calls `prepare(model, micro, phase)` with phase = step mod steps_per_batch. Whatever the objective
    keeps between those steps comes from `state_dict()` into each checkpoint and back through `load_state_dict`.
    """

    steps_per_batch: int = 1

    def count(self, batch: dict) -> torch.Tensor:
        return batch["loss_mask"].sum()

    def prepare(self, model: torch.nn.Module, micro: list[dict], phase: int) -> None:
        """Before an optimizer step's counting and forwards: its micro-batches (on the device), which of the
        `steps_per_batch` steps on them this is. Nothing by default."""

    def state_dict(self) -> dict:
        """What a checkpoint must keep of this objective for an exact resume (tensors and plain containers)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        raise NotImplementedError

    def frozen_flops(self, counts: tuple[int, int, int]) -> float:
        """Forward FLOPs of frozen models (a DPO reference, a teacher) a batch costs besides the trained model's,
        from its `flop_counts` (taken by the trainer on the host copy before the step); added to the logged `mfu`."""
        return 0.0


def flop_counts(batch: dict) -> tuple[int, int, int]:
    """(tokens, head tokens, attention pairs) of a batch for `forward_flops`/`training_flops`: the head at loss
    positions only, attention per packed document (Σ length²), else per row."""
    ids = batch["input_ids"]
    head = int((batch["loss_mask"] != 0).sum()) if "loss_mask" in batch else ids.numel()
    if "doc_ids" in batch:
        docs = batch["doc_ids"]
        keys = docs + torch.arange(docs.shape[0], device=docs.device)[:, None] * (int(docs.max()) + 1)
        pairs = int((torch.bincount(keys[docs >= 0]) ** 2).sum())
    else:
        pairs = ids.shape[0] * ids.shape[1] ** 2
    return ids.numel(), head, pairs


def model_inputs(batch: dict) -> dict:
    """The keyword arguments for the model's forward from a training batch."""
    inputs = {"input_ids": batch["input_ids"], "use_cache": False}
    if "doc_ids" in batch:
        inputs["document_ids"] = batch["doc_ids"]  # each packed document attends alone, positions from 0
    elif "attention_mask" in batch:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood (B, T), computed in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)


class MaskedLM(Objective):
    """Next-token cross-entropy on the positions the mask selects (pretrain: all real tokens; SFT: replies)."""

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput:
        out = training_view(model)(**model_inputs(batch), targets=batch["labels"], target_weights=batch["loss_mask"])
        return LossOutput(out.loss, out.aux_loss)

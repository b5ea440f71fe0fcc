"""Frozen models that sit beside the one being trained: the DPO/GRPO/PPO reference and the distillation teacher.

They are not part of the trained module, so the trainer never optimises, checkpoints or DDP-wraps them; a stage
loads them onto the training device itself and they run under the trainer's autocast like the policy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minimind.kernels import use_training_kernels
from minimind.kernels.head_loss import head_token_nll
from minimind.kernels.training import TrainingLM, training_view
from minimind.modeldir import load_model


def load_frozen(path: str | Path, device: torch.device | str = "cpu") -> TrainingLM:
    """A model directory loaded in eval mode with every parameter frozen (requires_grad False), as a
    `TrainingLM` (its head losses, `.model` the body, `.lm_head`, `.config`)."""
    model = load_model(path, device)
    for param in model.parameters():
        param.requires_grad_(False)
    use_training_kernels(model, torch.device(device))  # packed rows per document on a CPU, as the policy
    return training_view(model)


def completion_head_logprobs(hidden: torch.Tensor, head: torch.nn.Module, completion_ids: torch.Tensor) -> torch.Tensor:
    """log p of each completion token (N, T) from the final hidden states (N, P + T, dim) and the output head,
    without the (N, T, vocab) logits: a `head_loss_fn` for the policy's, the reference's or a scorer's forward
    (`partial(completion_head_logprobs, completion_ids=...)`)."""
    width = completion_ids.shape[1]
    return -head_token_nll(hidden[:, -width - 1 : -1], head, completion_ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP or torch.compile wrapper (generation runs on it directly)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner

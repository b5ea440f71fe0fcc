"""Frozen models that sit beside the one being trained: the DPO/GRPO/PPO reference and the distillation teacher.

They are not part of the trained module, so the trainer never optimises, checkpoints or DDP-wraps them; a stage
loads them onto the training device itself and they run under the trainer's autocast like the policy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minimind.model.head_loss import head_token_nll
from minimind.model.modeling_minimind import MiniMindForCausalLM
from minimind.modeldir import load_model


def load_frozen(path: str | Path, device: torch.device | str = "cpu") -> MiniMindForCausalLM:
    """A model directory loaded in eval mode with every parameter frozen (requires_grad False)."""
    model = load_model(path, device)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


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

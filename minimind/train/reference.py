"""Frozen models that sit beside the one being trained: the DPO/GRPO/PPO reference and the distillation teacher.

They are not part of the trained module, so the trainer never optimises, checkpoints or DDP-wraps them; a stage
loads them onto the training device itself and they run under the trainer's autocast like the policy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minimind.model.hub import load_model
from minimind.model.modeling_minimind import MiniMindForCausalLM
from minimind.train.objective import token_nll


def load_frozen(path: str | Path, device: torch.device | str = "cpu") -> MiniMindForCausalLM:
    """A model directory loaded in eval mode with every parameter frozen (requires_grad False)."""
    model = load_model(path, device)
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at every position: logits (B, T, V), labels (B, T) -> (B, T), in float32."""
    return -token_nll(logits, labels)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP or torch.compile wrapper (generation runs on it directly)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner

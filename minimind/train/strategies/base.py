"""The interface between the Trainer's loop and a data-parallel engine, and what the engines share.

Per optimizer step the Trainer calls: `set_lr`, then per micro-batch `accumulate(last)` around forward and
`backward`, then `step(max_norm, loss_finite)`. Checkpoints go through `model_state`/`optimizer_state`
(collective: every rank calls them; the full tensors come back on rank 0) and `load`; the product is written
from `final_model()`, an ordinary module on rank 0.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from minimind.kernels import use_training_kernels
from minimind.train.args import TrainConfig
from minimind.train.checkpoint import unique_state
from minimind.train.distributed import DistInfo

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on CPU, on rank 0 only


class Strategy:
    """One data-parallel engine. Subclasses wrap the model in `setup` and may override any step below."""

    sharded = False  # parameters are split over ranks: every rank must take part in each forward pass

    def __init__(self, cfg: TrainConfig, info: DistInfo, dtype: torch.dtype):
        self.cfg, self.info, self.dtype = cfg, info, dtype
        self.model: torch.nn.Module | None = None  # the model itself (sharded in place by fsdp)
        self.optimizer: Any = None  # has `param_groups`; the engine's own wrapper for zero2
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=dtype == torch.float16)

    # ---- set-up ---------------------------------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, trainable_only: bool) -> torch.nn.Module:
        """Wrap `model` and build the optimizer; returns the module the objective calls during training.

        `trainable_only`: checkpoints hold only the trainable tensors (the frozen base comes from --init).
        The tensor names are taken before wrapping: the tied head once, as `unique_state` keeps it.
        """
        self.state_names = list(unique_state(model, trainable_only))
        self.all_names = set(model.state_dict())
        use_training_kernels(model, self.info.device, self.cfg.compile)  # chosen once, before any wrapping
        return self.setup(model)

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """The engine's own wrapping (sets `self.model` and `self.optimizer`)."""
        raise NotImplementedError

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """AdamW groups over the trainable parameters: weight decay on matrices, none on norms and biases."""
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": self.cfg.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]  # e.g. LoRA trains matrices only; DeepSpeed rejects empty groups

    def adamw(self, groups: list[dict[str, Any]], fused: bool | None = None) -> torch.optim.AdamW:
        """The AdamW every strategy steps with: fused (one kernel over all parameters) on CUDA and CPU unless told
        otherwise; on CPU that is several times faster than the foreach form (docs/performance.md)."""
        cfg = self.cfg
        fused = self.info.device.type in ("cuda", "cpu") if fused is None else fused
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=1e-8, fused=fused)

    # ---- one optimizer step ---------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """This step's learning rate, on every parameter group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        """Drop the gradients (after a step, applied or not)."""
        self.optimizer.zero_grad(set_to_none=True)

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward; gradients are synchronised only when `last`."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate this micro-batch's gradients (scaled for fp16)."""
        self.scaler.scale(loss).backward()

    def step(self, max_norm: float, loss_finite: bool) -> tuple[float, bool]:
        """Unscale, clip to `max_norm` and apply the gradients; returns (norm before clipping, applied).

        A step with a non-finite loss or gradient norm is not applied (with fp16 the scaler decides instead).
        """
        self.scaler.unscale_(self.optimizer)
        norm = self.clip(max_norm)
        applied = loss_finite and (math.isfinite(norm) or self.scaler.is_enabled())
        if applied:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.zero_grad()
        return norm, applied

    def clip(self, max_norm: float) -> float:
        """Clip the gradients' global norm to `max_norm`; returns the norm before clipping."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ---- state ----------------------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """The full model tensors (tied ones once) on rank 0; collective."""
        state = self.model.state_dict()
        return {name: state[name].detach() for name in self.state_names}

    def optimizer_state(self) -> dict[str, Any]:
        """The full AdamW state keyed by parameter name, on rank 0 (empty elsewhere); collective."""
        return get_optimizer_state_dict(self.model, self.optimizer, options=FULL)

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
             scaler_state: dict[str, Any]) -> None:
        """Restore from full tensors and a full, name-keyed optimizer state (as saved, on any world size)."""
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.model, model_state, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)
        if scaler_state:  # empty when the checkpoint's run had no loss scaling
            self.scaler.load_state_dict(scaler_state)

    def scaler_state(self) -> dict[str, Any]:
        """The fp16 loss scaler's state (empty when there is no loss scaling)."""
        return self.scaler.state_dict()

    def final_model(self) -> torch.nn.Module | None:
        """The trained model as an ordinary module on rank 0 (None elsewhere); collective."""
        return self.model if self.info.is_main else None


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) model, gathered onto rank 0's CPU; collective."""
    return get_model_state_dict(model, options=FULL)

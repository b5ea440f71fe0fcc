"""Data-parallel engines for the one training loop: `--strategy ddp` (default), `fsdp` (FSDP2), `zero2` (DeepSpeed).

A strategy owns what differs between engines — how the model is wrapped, who holds the optimizer state, how
gradients are synchronised, and how full state is gathered for checkpoints — behind the `Strategy` interface
the Trainer calls. Every strategy writes checkpoints in one format (full model tensors + a full AdamW state
keyed by parameter name), so a checkpoint resumes on any number of processes and under any strategy.
"""

from __future__ import annotations

import torch

from minimind.errors import UserError
from minimind.train.args import TrainConfig
from minimind.train.distributed import DistInfo
from minimind.train.strategies.base import Strategy

STRATEGIES = ("ddp", "fsdp", "zero2")
SHARDED = ("fsdp", "zero2")  # need a process group even on one process


def make_strategy(cfg: TrainConfig, info: DistInfo, dtype: torch.dtype) -> Strategy:
    """The strategy named by `--strategy`, after checking that this run can use it."""
    if cfg.strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {cfg.strategy!r}")
    if cfg.zero_offload and cfg.strategy != "zero2":
        raise UserError("--zero-offload needs --strategy zero2")
    if cfg.strategy in SHARDED and dtype == torch.float16:
        raise UserError(f"--strategy {cfg.strategy} trains in fp32 or bf16 (fp16 loss scaling is wired for ddp "
                        "only); use --dtype bf16")
    if cfg.strategy == "fsdp":
        from minimind.train.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, info, dtype)
    if cfg.strategy == "zero2":
        from minimind.train.strategies.zero import ZeroStrategy

        return ZeroStrategy(cfg, info, dtype)
    from minimind.train.strategies.ddp import DDPStrategy

    return DDPStrategy(cfg, info, dtype)

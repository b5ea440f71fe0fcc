"""`--strategy ddp` (the default): every rank holds the whole model and optimizer; gradients are all-reduced.

On one process this is plain training. Under torchrun the model is wrapped in PyTorch's
DistributedDataParallel, and accumulation micro-steps other than the last skip the all-reduce (`no_sync`).
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from minimind.train.strategies.base import Strategy


class DDPStrategy(Strategy):
    """Replicated model and optimizer; DistributedDataParallel when there is more than one process."""


    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        self.model = model
        self.optimizer = self.adamw(self.param_groups(model))
        self.ddp: DistributedDataParallel | None = None
        if not self.info.distributed:
            return model
        device_ids = [self.info.local_rank] if self.info.device.type == "cuda" else None
        # MoE: an expert that got no token on this rank has no gradient; DDP must be told to expect that.
        moe = bool(getattr(getattr(model, "config", None), "use_moe", False))
        self.ddp = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=moe)
        return self.ddp

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        if last or self.ddp is None:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

"""`--strategy fsdp`: PyTorch FSDP2 (`fully_shard`) — parameters, gradients and optimizer state sharded.

Each transformer block is its own FSDP unit (all-gathered just before it runs, freed after), then the root
(embeddings, final norm, tied head). With bf16 the blocks compute in bf16 from fp32 shards and reduce
gradients in fp32. Accumulation micro-steps other than the last keep gradients unsharded and skip the
reduce-scatter, like DDP's `no_sync` (less traffic, more memory).

Checkpoints: the full model and optimizer state are gathered onto rank 0 (torch.distributed.checkpoint's
`get_state_dict` with `full_state_dict=True`) and written in the same files as ddp; loading slices each rank's
shard out of the full tensors, so an fsdp checkpoint resumes on any number of processes or under ddp. The final
model directory is an ordinary one: rank 0 fills an unsharded copy of the model with the gathered weights.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from minimind.train.strategies.base import Strategy, full_model_state


class FSDPStrategy(Strategy):
    """FSDP2 over the transformer blocks and the root module."""

    sharded = True

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        # Rank 0 keeps an empty (meta-device) copy of the model, to hold the gathered weights at the end.
        self.skeleton = meta_copy(model) if self.info.is_main else None
        mixed = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        for block in transformer_blocks(model):
            fully_shard(block, mp_policy=mixed)
        fully_shard(model, mp_policy=mixed)
        self.model = model
        self.optimizer = self.adamw(self.param_groups(model))  # over the sharded (DTensor) parameters
        return model

    def accumulate(self, last: bool) -> contextlib.AbstractContextManager:
        """Reduce-scatter gradients only on the step's last micro-batch."""
        assert isinstance(self.model, FSDPModule)
        self.model.set_requires_gradient_sync(last)  # read in backward, which runs inside this micro-step
        return contextlib.nullcontext()

    def clip(self, max_norm: float) -> float:
        """Clip over all shards; the norm is reduced across ranks."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # a DTensor: the norm over all shards
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def model_state(self) -> dict[str, torch.Tensor]:
        full = full_model_state(self.model)
        return {name: full[name] for name in self.state_names} if self.info.is_main else {}

    def final_model(self) -> torch.nn.Module | None:
        full = full_model_state(self.model)
        if not self.info.is_main:
            return None
        return materialize(self.skeleton, full)


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (children of every ModuleList named `layers`), each worth its own FSDP unit."""
    return [block for name, module in model.named_modules()
            if name.split(".")[-1] == "layers" and isinstance(module, torch.nn.ModuleList) for block in module]


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory); ties and buffers kept."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


def materialize(skeleton: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Give a `meta_copy` real parameters from a full state dict; parameters shared by name stay shared."""
    made: dict[int, torch.nn.Parameter] = {}
    for name, param in list(skeleton.named_parameters(remove_duplicate=False)):
        if id(param) not in made:
            made[id(param)] = torch.nn.Parameter(state[name].to(param.dtype), requires_grad=param.requires_grad)
        owner, _, attr = name.rpartition(".")
        setattr(skeleton.get_submodule(owner), attr, made[id(param)])
    return skeleton

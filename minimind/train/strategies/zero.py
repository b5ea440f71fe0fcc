"""`--strategy zero2`: DeepSpeed ZeRO stage 2 — optimizer state and gradients sharded over ranks.

Every rank keeps the whole model (fp32; bf16 comes from the Trainer's autocast, as with ddp); each owns one
slice of the flattened fp32 master weights, of the AdamW moments and of the reduced gradients, and the
updated slices are all-gathered back into the model after each step. `--zero-offload` keeps those slices and
the optimizer step on the CPU (ZeRO-Offload). Needs the deepspeed extra (`pip install -e '.[deepspeed]'` in a clone).

DeepSpeed's engine owns gradient reduction and the optimizer step; it runs with
`managed_gradient_accumulation: false`, so the Trainer's loop stays the boundary: `backward` per micro-batch
accumulates, `step` reduces, clips (DeepSpeed's `gradient_clipping`) and updates — or skips the update when
the gradient norm is not finite. The optimizer is our own torch AdamW, which DeepSpeed re-points at the flat
slices, so the update is the same arithmetic as ddp's.

Checkpoints are written in the same format as ddp/fsdp, not DeepSpeed's (which is pickled and tied to the
number of ranks): each AdamW moment is reassembled per parameter from the slices every rank owns (DeepSpeed's
tensor-fragment mapping, `param._hp_mapping`, tells which part of which parameter a rank's slice holds) and
saved by name; on load each rank copies its slice back out. So a zero2 checkpoint resumes on any number of
processes, and under ddp or fsdp too.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist

from minimind.errors import UserError, install_hint
from minimind.train.strategies.base import Strategy

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state


class ZeroStrategy(Strategy):
    """DeepSpeed ZeRO-2 (optionally with the optimizer offloaded to the CPU)."""


    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            import deepspeed
        except ImportError:
            raise UserError(f"--strategy zero2 needs DeepSpeed: {install_hint('deepspeed')}") from None
        if self.cfg.compile:
            raise UserError("--compile is not supported with --strategy zero2; use --strategy ddp or fsdp")
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its config dump is hundreds of lines
        warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
        cuda = self.info.device.type == "cuda"
        zero: dict[str, Any] = {"stage": 2, "contiguous_gradients": True, "overlap_comm": cuda,
                                "reduce_scatter": True}
        if self.cfg.zero_offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
        config = {
            "train_micro_batch_size_per_gpu": self.cfg.batch_size,
            "gradient_accumulation_steps": self.cfg.accumulation_steps,
            "gradient_clipping": self.cfg.grad_clip if self.cfg.grad_clip > 0 else 0.0,
            "zero_optimization": zero,
            "managed_gradient_accumulation": False,  # our loop says when a step ends
            "zero_allow_untested_optimizer": True,  # a plain torch AdamW
            "zero_force_ds_cpu_optimizer": False,  # ... also when offloaded (no compiled DeepSpeedCPUAdam needed)
            "steps_per_print": 1 << 62,
            "wall_clock_breakdown": False,
        }
        self.groups = self.param_groups(model)  # our own lists: DeepSpeed re-points the optimizer's at flat slices
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.adam = self.adamw([dict(g) for g in self.groups], fused=cuda and not self.cfg.zero_offload)
        # DeepSpeed insists on LOCAL_RANK even on one process; set it only while it initialises, so the variable
        # does not leak into this process's later children (accelerate would take them for distributed workers).
        added = "LOCAL_RANK" not in os.environ
        os.environ.setdefault("LOCAL_RANK", str(self.info.local_rank))
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=self.adam, config=config)
        finally:
            if added:
                os.environ.pop("LOCAL_RANK", None)
        self.model = model
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalised over the whole step

    def step(self, max_norm: float, loss_finite: bool) -> tuple[float, bool]:
        """DeepSpeed reduces, clips (to `--grad-clip`, set in its config) and updates, or skips the update when
        the gradient norm is not finite — which a non-finite loss always causes."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan"), bool(self.engine.was_step_applied())

    # ---- state: ZeRO slices <-> full tensors by name ---------------------------------------------------
    def flat_slices(self) -> list[torch.Tensor]:
        """This rank's flat fp32 slice of each parameter group (what the AdamW instance now optimises)."""
        return [group["params"][0] for group in self.adam.param_groups]

    def optimizer_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {}
        flats = self.flat_slices()
        for flat, group in zip(flats, self.groups):
            slice_state = self.adam.state.get(flat)
            if not slice_state:  # no step applied yet: AdamW creates its state lazily
                continue
            for p in group["params"]:
                entry = {"step": slice_state["step"].detach().clone().cpu()}
                entry.update({key: self.gather(p, slice_state[key]) for key in MOMENTS})
                state[self.names[id(p)]] = entry
        groups = []
        for live, group in zip(self.adam.param_groups, self.groups):
            settings = {k: v for k, v in live.items() if k != "params"}
            groups.append({**settings, "params": [self.names[id(p)] for p in group["params"]]})
        return {"state": state, "param_groups": groups} if self.info.is_main else {}

    def gather(self, param: torch.nn.Parameter, flat: torch.Tensor) -> torch.Tensor:
        """The full tensor for `param` out of every rank's slice `flat` of its group; collective, CPU result."""
        full = torch.zeros(param.numel(), dtype=torch.float32, device=self.info.device)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:  # this rank owns elements [lp.start, lp.start + numel) of the parameter
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            full.narrow(0, lp.start, lp.numel).copy_(flat.narrow(0, hp.start, hp.numel))
        if dist.get_world_size() > 1:
            dist.all_reduce(full)  # every element is owned by exactly one rank
        return full.view_as(param).cpu()

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
             scaler_state: dict[str, Any]) -> None:
        self.model.load_state_dict(model_state, strict=False)  # names were checked against the model
        self.optimizer.refresh_fp32_params()  # the master slices from the (fp32) model weights, exactly
        saved = optimizer_state.get("state", {})
        for flat, group in zip(self.flat_slices(), self.groups):
            names = [self.names[id(p)] for p in group["params"]]
            if not names or names[0] not in saved:
                continue
            # AdamW keeps `step` on the CPU unless fused (then beside the parameters).
            step_device = flat.device if self.adam.defaults.get("fused") else torch.device("cpu")
            slice_state = {"step": saved[names[0]]["step"].to(step_device, torch.float32)}
            for key in MOMENTS:
                slice_state[key] = torch.zeros_like(flat)
                for p, name in zip(group["params"], names):
                    self.scatter(p, saved[name][key], slice_state[key])
            self.adam.state[flat] = slice_state

    @staticmethod
    def scatter(param: torch.nn.Parameter, full: torch.Tensor, flat: torch.Tensor) -> None:
        """Copy this rank's part of the full tensor `full` (for `param`) into its group slice `flat`."""
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            flat.narrow(0, hp.start, hp.numel).copy_(full.reshape(-1).narrow(0, lp.start, lp.numel))

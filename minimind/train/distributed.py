"""Process group, device and precision setup, so every stage runs the same under python and under torchrun.

`torchrun --nproc_per_node N -m minimind <verb> ...` sets RANK/WORLD_SIZE/LOCAL_RANK; we then join the
process group (NCCL on CUDA, gloo on CPU). Without those variables everything is a single process and the
helpers here are no-ops, except that the sharded strategies (fsdp, zero2) need a group even on one process,
so they get a one-member group held in memory.

Errors a user can fix are raised on every rank together, so that one rank never waits forever in a
collective its peers have left: during set-up each rank reports success or its error through `agree`, and
all ranks then raise the same `SharedError`. Rank 0 prints it; the others exit with the same code silently.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from minimind.device import resolve_device, warn_if_slow_on_cpu
from minimind.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Ranks other than 0 wait on this group while rank 0 tokenizes a large JSONL (`main_first`); the NCCL group's
# own timeout (minutes) would cut that short, so set-up talk goes over a gloo group with a long one.
SETUP_TIMEOUT = timedelta(hours=12)
# Leaving the group (`destroy_process_group`) is where a rank whose run is over can still wait on the others (a CI
# run once sat four minutes after "done"); past this many seconds the rank exits without it.
LEAVE_TIMEOUT_S = 60.0
T = TypeVar("T")


class SharedError(UserError):
    """A user error every rank raised together (after `agree`); only rank 0 reports it."""


@dataclass
class DistInfo:
    """Where this process stands: its rank, the world size, its device, and the set-up group (if any)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    setup_group: Any = None  # gloo group for objects (errors) during set-up; None on a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA when supported (else fp16), fp32 elsewhere (bf16 matmuls are much slower on CPUs
    without native bf16; `--dtype bf16` trains faster on those with it, docs/performance.md)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    if name == "fp16" and device.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU; use fp32 or bf16 on CPU")
    warn_if_slow_on_cpu(DTYPES[name], device, f"--dtype {name}")
    return DTYPES[name]


def init_distributed(device_name: str, need_group: bool = False) -> DistInfo:
    """Join the torchrun process group if there is one (or a one-process group if `need_group`); pick the device.

    Multi-node runs need nothing more: torchrun's `--nnodes/--node_rank/--master_addr` (or `--rdzv-endpoint`)
    set RANK, WORLD_SIZE and MASTER_ADDR/PORT for every process, and `env://` reads them.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and (world > 1 or need_group):
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this host has {torch.cuda.device_count()}; "
                            "give torchrun --nproc_per_node at most that many")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        setup_group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
        return DistInfo(rank, local_rank, world, device, setup_group)
    if need_group and not dist.is_initialized():
        # One process, no torchrun: an in-memory store, so no port is needed.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(rank=0, local_rank=local_rank, world_size=1, device=device)


def cleanup(info: DistInfo, exit_code: int = 0) -> None:
    """Leave torchrun's process group (also after an error, so torchrun sees a clean exit).

    Should leaving take over `LEAVE_TIMEOUT_S`, the process says so on stderr and exits at once with `exit_code`
    (what it would have exited with), so a finished job never hangs at its end.

    A one-process group (fsdp/zero2 without torchrun) is kept for the life of the process: it costs nothing,
    and DeepSpeed caches groups made from it, so a second run in the same process (a test, a notebook) reuses it.
    """
    if info.distributed and dist.is_initialized():
        leave_within(dist.destroy_process_group, LEAVE_TIMEOUT_S, exit_code, f"rank {info.rank}")


def leave_within(leave: Callable[[], object], seconds: float, exit_code: int, who: str) -> None:
    """Call `leave`; if it has not returned after `seconds`, print one line and end the process with `exit_code`
    (through `os._exit`, from a timer thread: the stuck call never returns to let the process end otherwise)."""
    def give_up() -> None:
        print(f"minimind: {who}: leaving the process group took over {seconds:g} s; exiting without it",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exit_code)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        leave()
    finally:
        timer.cancel()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op on one process)."""
    if info.distributed:
        dist.barrier()


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; the input is left alone)."""
    if info.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def agree(info: DistInfo, error: str | None) -> None:
    """Every rank says whether it failed; if any did, every rank raises the first failure as a SharedError."""
    if not info.distributed:
        if error is not None:
            raise SharedError(error)
        return
    errors: list[str | None] = [None] * info.world_size
    dist.all_gather_object(errors, error, group=info.setup_group)
    for rank, message in enumerate(errors):
        if message is not None:
            raise SharedError(message if rank == 0 else f"rank {rank}: {message}")


def collective(info: DistInfo, fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; a UserError on any rank becomes a SharedError on all of them."""
    result, error = None, None
    try:
        result = fn()
    except SharedError:
        raise
    except UserError as err:
        error = str(err)
    agree(info, error)  # raises if any rank failed
    return result


def main_first(info: DistInfo, fn: Callable[[bool], T]) -> T:
    """Run `fn(True)` on rank 0 (e.g. prepare a dataset) while the others wait, then `fn(False)` on the rest.

    An error on rank 0 is raised on every rank, so the others do not wait for a result that never comes.
    """
    if info.is_main:
        return collective(info, lambda: fn(True))
    agree(info, None)
    return fn(False)

"""Device names from the command line -> torch devices, shared by training, inference and serving."""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from functools import cache

import torch

from minimind.errors import UserError

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else mps, else cpu; an explicit device that is not there is a clear error."""
    mps = getattr(torch.backends, "mps", None)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if name == "mps" and not (mps is not None and mps.is_available()):
        raise UserError("--device mps: MPS is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows (try cpu, cuda, cuda:1, mps)") from None


# The long names torch and MiniMind's reference scripts use, accepted for the short ones our files record.
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(value: str) -> str:
    """argparse `type=` for `--dtype`: `float32/bfloat16/float16` -> `fp32/bf16/fp16` (others unchanged).

    Normalising at parse time keeps the short name in train_config.json, so a run started with `bfloat16`
    resumes exactly like one started with `bf16`.
    """
    return DTYPE_ALIASES.get(value.lower(), value.lower())



@dataclass(frozen=True)
class CpuInfo:
    """The CPU as /proc/cpuinfo names it: model string and instruction-set flags (x86 `flags`, Arm `Features`)."""

    model: str
    flags: frozenset[str]


@cache
def cpu_info() -> CpuInfo:
    """This machine's CPU, read once; where /proc/cpuinfo is missing (not Linux), `platform.processor()` and no
    flags, so code that needs a flag takes its portable path."""
    model, flags = "", None
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and not model:
                    model = value.strip()
                elif name in ("flags", "Features") and flags is None:
                    flags = frozenset(value.split())
    except OSError:
        model = platform.processor()
    return CpuInfo(model, flags or frozenset())


def warn_if_slow_on_cpu(dtype: torch.dtype, device: torch.device, what: str) -> None:
    """Log a warning when `what` (a flag) asks for bf16 or fp16 arithmetic on a CPU without bf16 instructions
    (AVX-512 BF16 or AMX): PyTorch then converts every matmul through float32, tens of times slower than float32
    itself (2-core AVX2 machines: about 1 GFLOP/s against 110)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not (
            {"avx512_bf16", "amx_bf16"} & cpu_info().flags):
        log.warning("%s: this CPU has no bf16 instructions (AVX-512 BF16 or AMX); %s matmuls will run far slower "
                    "than fp32 here", what, str(dtype).removeprefix("torch."))

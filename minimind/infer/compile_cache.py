"""The compiled decode step kept on disk, so that only the first start on a machine pays for compiling it.

`torch.compile` traces the step with Dynamo and generates its C++ with Inductor at every start; Inductor's own
caches skip the C++ compiler on a second start but not the tracing, which costs about as much again. Here the
step is compiled ahead of time (`torch.compile(...).aot_compile`, fullgraph) and the result, the traced
bytecode with its guards and the generated kernels, is saved to one file; a later start loads that file and
calls it without tracing anything.

The file name is a hash of everything the compiled code depends on: the torch and Python versions, the CPU
(its model name and instruction-set flags) or GPU, torch's thread count (the saved guards check it), the model's config (shapes only: the weights are inputs of
the compiled step, so models of one shape share a file), the dtype, whether a quantized head is inside the graph,
the compile options, and the source of the modules the step traces (a changed model file is a new key). The
loaded step still checks its guards at every call; if they ever refuse an input, the decoder falls back to
an ordinary `torch.compile` (compiled.py).

Where: `$MINIMIND_CACHE/compile`, else `$XDG_CACHE_HOME/minimind/compile`, else `~/.cache/minimind/compile`.
Delete the directory to start afresh; nothing else reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from minimind.device import cpu_info

log = logging.getLogger(__name__)

# The modules whose code the compiled step runs: the model, its kernels, the cache and the int8 linear.
_TRACED_SOURCES = ("model", "kernels", "kernels/int_gemv.cpp", "infer/cache.py", "infer/compiled.py",
                   "infer/quantize.py")


def default_compile_cache() -> Path:
    """The directory compiled decode steps are kept in (see the module doc for the order of choices)."""
    root = os.environ.get("MINIMIND_CACHE")
    if root:
        return Path(root).expanduser() / "compile"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "minimind" / "compile"


def _machine() -> dict:
    """What generated code depends on about this machine: CPU model and flags, or the GPU."""
    info = cpu_info()
    cpu = {"machine": platform.machine(), "model": info.model, "flags": " ".join(sorted(info.flags))}
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "gpu": gpu}


def _source_digest() -> str:
    """Hash of the source files the compiled step traces (a saved step is stale once they change)."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for entry in _TRACED_SOURCES:
        path = package / entry
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(package).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class CompileKey:
    """What one saved decode step is valid for; `name` is its file name."""

    fields: dict

    @property
    def name(self) -> str:
        """`decode-<hash>.bin`: the hash of every field."""
        text = json.dumps(self.fields, sort_keys=True, default=str)
        return f"decode-{hashlib.sha256(text.encode()).hexdigest()[:24]}.bin"


def compile_key(config: dict, device: torch.device, dtype: torch.dtype, head_in_graph: bool,
                options: dict | None) -> CompileKey:
    """The key of a decode step: model config (shapes), device type, dtype, whether the (int8 or int4) head is in
    the graph, options, machine, threads, versions."""
    shape = {k: v for k, v in config.items() if not k.startswith("_")}  # not `_name_or_path`: where it was loaded
    return CompileKey({
        "torch": torch.__version__, "python": sys.version.split()[0], "machine": _machine(),
        "threads": torch.get_num_threads(),  # the saved step's guards check it (global state)
        "config": shape, "device": device.type, "dtype": str(dtype), "head_in_graph": head_in_graph,
        "options": options, "sources": _source_digest(),
    })


def load_step(path: Path, module: torch.nn.Module):
    """The compiled step saved at `path`, called as step(module, ...); None when the file is missing or unreadable."""
    if not path.is_file():
        return None
    # The first start validated the vector instruction set on this machine (the key holds its CPU flags):
    # Inductor would otherwise probe each one again by compiling and loading a test library in a subprocess.
    torch._inductor.config.cpp.vec_isa_ok = True
    try:  # under inference mode, where the engine calls it: the guards rebuilt here expect its tensors
        with open(path, "rb") as handle, torch.inference_mode():
            return torch.compiler.load_compiled_function(handle, external_data={"step": module})
    except Exception as err:  # a file from an interrupted write or another torch: compile again
        log.warning("compile cache: could not load %s (%s); compiling again", path, err)
        return None


def save_step(compiled, path: Path, module: torch.nn.Module) -> bool:
    """Write a compiled step to `path` (atomically); False, with a warning, when it cannot be saved."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # another start never reads half a file
        compiled.save_compiled_function(str(partial), external_data={"step": module})
        os.replace(partial, path)
        return True
    except Exception as err:  # a read-only cache or a step torch cannot serialise: it still runs
        log.warning("compile cache: could not save %s (%s)", path, err)
        return False

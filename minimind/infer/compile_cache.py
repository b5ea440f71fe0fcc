"""The compiled decode step kept on disk, so that only the first start on a machine pays for compiling it.

The decode step (compiled.py) is exported with torch.export and compiled by AOTInductor into a package: a
shared library of the generated code, a few MB, without the weights (the loaded step reads the model's own
tensors). A later start loads that file in milliseconds: nothing is traced or compiled again.

The file name is a hash of everything the generated code depends on: the torch and Python versions, the CPU
(its model name and instruction-set flags) or GPU, torch's thread count (the generated loops are written for
it), the model's config (shapes only: the weights are not in the package, so models of one shape share a
file), the dtype, whether a quantized head is inside the graph, the compile options, and the source of the
modules the step traces (a changed model file is a new key). A file that cannot be loaded is compiled again.

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
        """`decode-<hash>.pt2`: the hash of every field."""
        text = json.dumps(self.fields, sort_keys=True, default=str)
        return f"decode-{hashlib.sha256(text.encode()).hexdigest()[:24]}.pt2"


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


# The package holds the generated code only: the weights stay the model's own tensors, handed to the loaded step
# (so models of one shape share a file, and a package is a few MB instead of a copy of the weights).
PACKAGE_OPTIONS = {"aot_inductor.package_constants_in_so": False}


def save_package(program: torch.export.ExportedProgram, path: Path, options: dict) -> bool:
    """Compile an exported step with AOTInductor into a package at `path` (written atomically); False, with a
    warning, when it cannot be written (the compiling itself raises)."""
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")  # another start never reads half a file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a read-only cache: the step is built and used in a temporary place instead
        log.warning("compile cache: could not write to %s (%s)", path.parent, err)
        return False
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=options)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return True


def load_package(path: Path, constants: dict[str, torch.Tensor]):
    """The packaged step at `path`, reading its weights from `constants` (name -> tensor, used in place, kept alive
    by the caller) -> a callable run([inputs]) -> [outputs]; None when the file is missing or unusable."""
    if not path.is_file():
        return None
    try:
        # The loader itself rather than torch._inductor.aoti_load_package: that one first compares the package's
        # CPU instruction set with this machine's, which spawns about ten Python processes to probe it (1.4 s of
        # a 2 s start here). The key of a cached package already names this machine's CPU (compile_key).
        # Arguments: the package's model name, not single-threaded, one runner, the CPU (device index -1).
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        loader.load_constants({name: constants[name] for name in loader.get_constant_fqns()},
                              False, True, True, False)  # the active buffer, every constant, user-managed, no copy
    except Exception as err:  # a file from an interrupted write or another torch: compile again
        log.warning("compile cache: could not load %s (%s); compiling again", path, err)
        return None
    return loader.run

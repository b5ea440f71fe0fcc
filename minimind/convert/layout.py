"""Weight-layout facts the converters share: RoPE row orders, source dtypes, output directories.

Two RoPE conventions exist for the same function. Ours (and HF Llama's) is *rotate-half*: within a head of
size d, dimension i is rotated together with dimension i + d/2. MiniMind2 (complex numbers via
`view_as_complex`) and llama.cpp's `llama` architecture are *interleaved*: dimension 2i with 2i + 1. The
attention scores are the same if the rows of the q and k projections are permuted within each head, so
conversion is a reshape, never a change of numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from minimind.errors import UserError
from minimind.model.configuration_minimind import MiniMindConfig
from minimind.modeldir import TOKENIZER_FILES

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k projection rows (n_heads·d, ...) so row j·d/2 + i of each head lands at 2i + j."""
    d = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    # (heads, 2 halves, d/2 pairs, ...) -> (heads, d/2 pairs, 2 members, ...)
    return weight.reshape(n_heads, 2, d // 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `rotate_half_to_interleaved`: row 2i + j of each head goes to j·d/2 + i."""
    d = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, d // 2, 2, *rest).transpose(1, 2).reshape(weight.shape).contiguous()


def require_dense(config: MiniMindConfig, target: str) -> None:
    """Refuse an MoE model for a format whose architecture has no routed experts."""
    if config.use_moe:
        raise UserError(
            f"config field 'use_moe' is true: {target} holds dense models only (this model has "
            f"{config.n_routed_experts} routed + {config.n_shared_experts} shared experts)"
        )


def stored_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype the weights were saved in (read from the safetensors header, no tensor loaded)."""
    from safetensors import safe_open

    weights = Path(model_dir) / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{model_dir}: model.safetensors is missing")
    with safe_open(str(weights), framework="pt") as handle:
        first = next(iter(handle.keys()), None)
        if first is None:
            raise UserError(f"{weights}: holds no tensors")
        name = handle.get_slice(first).get_dtype()
    if name not in SAFETENSORS_DTYPES:
        raise UserError(f"{weights}: tensor '{first}' has dtype {name}; expected F32, F16 or BF16")
    return SAFETENSORS_DTYPES[name]


def copy_tokenizer(source_dir: str | Path, out_dir: Path) -> None:
    """Copy tokenizer.json and tokenizer_config.json (the chat template lives in the latter)."""
    source_dir = Path(source_dir)
    for name in TOKENIZER_FILES:
        if not (source_dir / name).is_file():
            raise UserError(f"{source_dir}: {name} is missing (expected a tokenizer directory)")
        shutil.copyfile(source_dir / name, out_dir / name)


def check_output_dir(out_dir: str | Path) -> Path:
    """A directory output must be new or empty, so no stale file (e.g. remote-code .py) mixes in."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--out {out_dir}: exists and is not an empty directory; choose a new path")
    return out_dir


def write_directory(out_dir: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory in a staging folder beside `out_dir`, then rename it into place.

    A failure halfway leaves nothing at `out_dir`, so a half-written export is never mistaken for a model.
    """
    out_dir = check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fill(staging)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def fold_chat_template(source_dir: Path, out_dir: Path) -> None:
    """Put `source_dir/chat_template.jinja` into `out_dir/tokenizer_config.json` when the copied config has no
    template: transformers 5 saves the template beside the tokenizer, while a model directory keeps it in the
    two tokenizer files every export copies."""
    jinja, config_file = source_dir / "chat_template.jinja", out_dir / "tokenizer_config.json"
    if not jinja.is_file() or not config_file.is_file():
        return
    data = json.loads(config_file.read_text(encoding="utf-8"))
    if not data.get("chat_template"):
        data["chat_template"] = jinja.read_text(encoding="utf-8")
        config_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

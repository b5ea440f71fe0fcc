"""Merge a PEFT-format LoRA adapter into its base model and save the result as a model directory.

    minimind convert runs/sft --merge-lora runs/lora-identity --out runs/sft-identity

Reading and merging the adapter is `minimind.lora` (`read_adapter`, `merge_adapter`), the same code that loads an
adapter directory as a model; this module only adds the output directory and the base's saved dtype.
"""

from __future__ import annotations

from pathlib import Path

from minimind.convert.layout import check_output_dir, stored_dtype
from minimind.lora import ADAPTER_WEIGHTS, merge_adapter, read_adapter
from minimind.modeldir import load_model_dir, save_model_dir


def merge_adapter_dir(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> int:
    """Write base + adapter as a model directory (in the base's saved dtype); returns modules merged."""
    out_dir = check_output_dir(out_dir)
    config, tensors = read_adapter(adapter_dir)
    model, tokenizer = load_model_dir(base_dir)  # fp32, so the merge is computed at full precision
    merged = merge_adapter(model, config, tensors, Path(adapter_dir) / ADAPTER_WEIGHTS)
    save_model_dir(model.to(stored_dtype(base_dir)), tokenizer, out_dir)
    return merged

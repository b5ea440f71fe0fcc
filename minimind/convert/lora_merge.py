"""Merge a PEFT-format LoRA adapter into its base model: W' = W + scale · B·A, saved as a model directory.

    minimind convert runs/sft --merge-lora runs/lora-identity --out runs/sft-identity

An adapter directory holds `adapter_config.json` (r, lora_alpha, use_rslora, ...) and
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` (r, in) and
`...lora_B.weight` (out, r). scale = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; `alpha_pattern`
overrides alpha per module and r is read from each tensor, so `rank_pattern` needs no special case.
Adapter features that are not a plain low-rank update (DoRA, trained biases, modules_to_save, ...) are
refused by name rather than merged wrongly.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from minimind.convert.layout import check_output_dir, stored_dtype
from minimind.errors import UserError
from minimind.model.modeling_minimind import MiniMindForCausalLM
from minimind.modeldir import load_model_dir, save_model_dir

ADAPTER_KEY = re.compile(
    r"base_model\.model\.(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?"
)
TIED = ("lm_head", "model.embed_tokens")
# adapter_config.json fields whose non-default value means more than W + scale·B·A
UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "trained LoRA biases",
    "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "modules_to_save",
    "target_parameters": "target_parameters",
    "layer_replication": "layer_replication",
    "trainable_token_indices": "trainable_token_indices",
}


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (adapter_config.json as a dict, the adapter tensors), with clear errors for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_file, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for needed in (config_file, weights):
        if not needed.is_file():
            raise UserError(f"{adapter_dir}: not a PEFT adapter directory ({needed.name} is missing)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{config_file}: field 'peft_type' must be 'LORA'")
    for field in ("r", "lora_alpha"):
        if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
            raise UserError(
                f"{config_file}: field '{field}' must be a positive number, got {config.get(field)!r}"
            )
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise UserError(f"{config_file}: field '{field}' is set; merging {what} is not supported")
    if config.get("bias", "none") != "none":
        raise UserError(f"{config_file}: field 'bias' is {config['bias']!r}; only 'none' can be merged")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"{weights}: cannot read safetensors ({err})") from None
    return config, tensors


def lora_scale(config: dict, module: str, rank: int) -> float:
    """alpha / r (or / sqrt(r) with rsLoRA); alpha from the first `alpha_pattern` entry matching `module`."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def pair_adapter_tensors(
    tensors: dict[str, torch.Tensor], source: Path
) -> dict[str, dict[str, torch.Tensor]]:
    """Group adapter tensors by target module: {module: {"lora_A": A, "lora_B": B}}."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = ADAPTER_KEY.fullmatch(key)
        if match is None:
            raise UserError(
                f"{source}: key '{key}' is not a LoRA weight (expected base_model.model.<module>."
                "lora_A.weight / lora_B.weight)"
            )
        module, part = match.groups()
        if module.startswith(TIED) or part.startswith("lora_embedding"):
            raise UserError(
                f"{source}: key '{key}' adapts the embedding/output head, which this model ties "
                "together; merging would change both"
            )
        modules.setdefault(module, {})[part] = tensor
    for module, parts in modules.items():
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                raise UserError(f"{source}: key 'base_model.model.{module}.{part}.weight' is missing")
    return modules


@torch.no_grad()
def merge_into(
    model: MiniMindForCausalLM, config: dict, tensors: dict[str, torch.Tensor], source: Path
) -> int:
    """Add scale · B·A to each adapted weight of `model` in place; returns how many modules were merged."""
    params = dict(model.named_parameters())
    modules = pair_adapter_tensors(tensors, source)
    for module, parts in modules.items():
        a, b = parts["lora_A"], parts["lora_B"]
        key = f"base_model.model.{module}.lora_A.weight"
        if f"{module}.weight" not in params:
            raise UserError(
                f"{source}: key '{key}' targets module '{module}', which the base model does not have"
            )
        weight = params[f"{module}.weight"]
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[0] != b.shape[1]
            or (b.shape[0], a.shape[1]) != tuple(weight.shape)
        ):
            raise UserError(
                f"{source}: '{module}' lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                f"make a delta of the base weight's shape {tuple(weight.shape)}"
            )
        delta = (b.float() @ a.float()) * lora_scale(config, module, a.shape[0])  # (out, in)
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return len(modules)


def merge_lora(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> int:
    """Write base + adapter as a model directory (in the base's saved dtype); returns modules merged."""
    out_dir = check_output_dir(out_dir)
    config, tensors = read_adapter(adapter_dir)
    model, tokenizer = load_model_dir(base_dir)  # fp32, so the merge is computed at full precision
    merged = merge_into(model, config, tensors, Path(adapter_dir) / "adapter_model.safetensors")
    save_model_dir(model.to(stored_dtype(base_dir)), tokenizer, out_dir)
    return merged

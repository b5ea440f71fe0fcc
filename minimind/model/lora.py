"""LoRA (low-rank adapters): y = W x + (alpha / r) · B A dropout(x), with W frozen and only A, B trained.

`apply_lora(model, ...)` swaps the chosen `nn.Linear` layers for `LoRALinear` in place. The wrapped layer keeps
its own `weight` (so base parameter names are unchanged) and gains `lora_A` (r x in) and `lora_B` (out x r)
sub-layers, which gives exactly PEFT's tensor names: `model.layers.0.self_attn.q_proj.lora_A.weight`.
`save_peft_adapter` writes the adapter in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
keys prefixed `base_model.model.`), so `peft.PeftModel.from_pretrained(MiniMindForCausalLM, dir)` loads it.

This module is training-side only: it is not copied into model directories as remote code.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from minimind.errors import UserError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_REGEX_CHARS = set("*+?[](){}|^$\\")


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update; B starts at zero so the output starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **kw)  # weight (r, in)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **kw)  # weight (out, r)
        # A like nn.Linear's own init (kaiming-uniform, a=sqrt(5)) and B = 0, as in the LoRA paper and PEFT.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def reset_parameters(self) -> None:
        """The base weights come from the wrapped layer; nothing to initialise here (nn.Linear calls this)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, shaped like `weight` (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function: weight W + scaling · B A."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


def parse_targets(spec: str | list[str] | tuple[str, ...]) -> str | list[str]:
    """`--target-modules` -> PEFT's form: a list of module-name suffixes, or one regex (full match on the name).

    "q_proj,v_proj" is a list; anything with regex characters, e.g. `.*layers\\.[01]\\..*_proj`, is a regex.
    """
    if not isinstance(spec, str):
        return list(spec)
    spec = spec.strip()
    if any(c in _REGEX_CHARS for c in spec):
        try:
            re.compile(spec)
        except re.error as err:
            raise UserError(f"--target-modules: {spec!r} is not a valid regular expression ({err})") from None
        return spec
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if not names:
        raise UserError("--target-modules is empty; give module names such as q_proj,v_proj or a regex")
    return names


def matches(name: str, targets: str | list[str]) -> bool:
    """PEFT's rule: a regex must match the whole module name; a name list matches the name or a `.name` suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               targets: str | list[str] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every matching nn.Linear in LoRALinear, freeze everything else; returns the wrapped module names."""
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    targets = parse_targets(targets)
    chosen = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and matches(name, targets)]
    if not chosen:
        raise UserError(f"--target-modules {targets!r} matches no linear layer of the model")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA-wrapped layers by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under the model's own names (`...q_proj.lora_A.weight`)."""
    return {name: tensor for name, tensor in model.state_dict().items() if ".lora_A." in name or ".lora_B." in name}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + scaling · B A) and drop the LoRA layers, in place."""
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.merged())
    return model


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model: str, targets: str | list[str]) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's LoRA format."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout,
        "target_modules": parse_targets(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
    }
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    save_file(tensors, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply a PEFT LoRA adapter directory to `model` (wrap the layers it names, load A and B), in place."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{adapter_dir}: not a LoRA adapter directory ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise UserError(f"{config_file}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    apply_lora(model, config["r"], config["lora_alpha"], 0.0, config["target_modules"])
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(adapter_dir / ADAPTER_WEIGHTS)).items()}
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{adapter_dir / ADAPTER_WEIGHTS}: missing tensor '{PEFT_PREFIX + missing[0]}'")
    model.load_state_dict(state, strict=False)
    return model

"""LoRA (low-rank adapters): y = W x + (alpha / r) · B A dropout(x), with W frozen and only A, B trained.

`apply_lora(model, ...)` swaps the chosen `nn.Linear` layers for `LoRALinear` in place. The wrapped layer keeps
its own `weight` (so base parameter names are unchanged) and gains `lora_A` (r x in) and `lora_B` (out x r)
sub-layers, which gives exactly PEFT's tensor names: `model.layers.0.self_attn.q_proj.lora_A.weight`.
`save_peft_adapter` writes the adapter in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
keys prefixed `base_model.model.`), so `peft.PeftModel.from_pretrained(MiniMindForCausalLM, dir)` loads it.

It is also the one reader of adapter directories: `read_adapter` checks `adapter_config.json` (r, lora_alpha,
use_rslora, alpha_pattern, ...) and reads `adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight`
(r, in) and `...lora_B.weight` (out, r)); `merge_adapter` adds scale · B·A to a plain model's weights (loading an
adapter directory as a model, `minimind convert --merge-lora`) and `load_peft_adapter` wraps the layers instead
(training on top of an adapter). scale = lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; `alpha_pattern`
overrides alpha per module and r is read from each tensor, so `rank_pattern` needs no special case. Adapter
features that are not a plain low-rank update (DoRA, trained biases, modules_to_save, ...) are refused by name
rather than merged wrongly.

This module sits above the model and is not copied into model directories as remote code.
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


def read_adapter(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (adapter_config.json as a dict, the adapter tensors), with clear errors for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_file, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
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


def pair_adapter_tensors(tensors: dict[str, torch.Tensor], source: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Group adapter tensors by target module: {module: {"lora_A": A (r, in), "lora_B": B (out, r)}}."""
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
                raise UserError(f"{source}: key '{PEFT_PREFIX}{module}.{part}.weight' is missing")
    return modules


def _checked_pairs(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], source: Path):
    """Yield (module name, A (r, in), B (out, r), scale) for each adapted module of `model`, each checked against
    the base weight's shape."""
    params = dict(model.named_parameters())
    for module, parts in pair_adapter_tensors(tensors, source).items():
        a, b = parts["lora_A"], parts["lora_B"]
        if f"{module}.weight" not in params:
            raise UserError(f"{source}: key '{PEFT_PREFIX}{module}.lora_A.weight' targets module '{module}', "
                            "which the base model does not have")
        weight = params[f"{module}.weight"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise UserError(
                f"{source}: '{module}' lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                f"make a delta of the base weight's shape {tuple(weight.shape)}"
            )
        yield module, a, b, lora_scale(config, module, a.shape[0])


@torch.no_grad()
def merge_adapter(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor], source: Path) -> int:
    """Add scale · B·A to each adapted weight of `model` in place (computed in float32); returns how many
    modules were merged. `config, tensors` come from `read_adapter`; `source` names the file in errors."""
    merged = 0
    params = dict(model.named_parameters())
    for module, a, b, scale in _checked_pairs(model, config, tensors, source):
        weight = params[f"{module}.weight"]
        weight.copy_((weight.float() + (b.float() @ a.float()) * scale).to(weight.dtype))  # (out, in)
        merged += 1
    return merged


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Apply a PEFT LoRA adapter directory to `model` (wrap the layers it names, load A and B), in place."""
    adapter_dir = Path(adapter_dir)
    config, tensors = read_adapter(adapter_dir)
    pairs = list(_checked_pairs(model, config, tensors, adapter_dir / ADAPTER_WEIGHTS))
    ranks = {a.shape[0] for _, a, _, _ in pairs}
    apply_lora(model, max(ranks, default=config["r"]), config["lora_alpha"], 0.0, [name for name, *_ in pairs])
    with torch.no_grad():
        for name, a, b, scale in pairs:
            layer = model.get_submodule(name)
            if a.shape[0] != layer.rank:  # rank_pattern: this module's rank differs from the others'
                layer.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False, device=a.device, dtype=layer.weight.dtype)
                layer.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False, device=b.device, dtype=layer.weight.dtype)
                layer.rank = a.shape[0]
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
            layer.scaling = scale
    return model

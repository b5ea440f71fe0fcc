"""Model directories (config.json, model.safetensors, tokenizer files): save and load with clear errors, never pickle.

A model directory holds config.json, model.safetensors, generation_config.json, the tokenizer files and the
model's own code (HF remote code), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
works with nothing but torch and transformers installed.

A LoRA adapter directory (`minimind lora`'s output, or any PEFT LoRA adapter of a MiniMind model) loads too:
its base model (`base_model_name_or_path` in adapter_config.json, a local directory) with the adapter merged
in memory, so every verb that takes a model directory takes an adapter as well.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from minimind.errors import UserError
from minimind.model.configuration_minimind import MiniMindConfig
from minimind.model.modeling_minimind import MiniMindForCausalLM

MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Sampling defaults written to generation_config.json (the reference project's chat defaults).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.85, "top_p": 0.85, "max_new_tokens": 512}


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object, or a UserError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def load_config(path: str | Path) -> MiniMindConfig:
    """Read `path/config.json` into a MiniMindConfig, or fail with one sentence naming the file."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise UserError(f"{path}: no such model directory")
    if not config_file.is_file():
        raise UserError(f"{path}: not a model directory (config.json is missing)")
    data = read_json_object(config_file)
    if data.get("model_type", "minimind") != "minimind":
        raise UserError(f"{config_file}: model_type is {data.get('model_type')!r}, expected 'minimind'")
    try:
        return MiniMindConfig(**data)
    except (ValueError, TypeError) as err:
        raise UserError(f"{config_file}: {err}") from None
    except Exception as err:  # noqa: BLE001 - transformers' checks of its own fields (dtype, rope_scaling, ...)
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise UserError(f"{config_file}: not a valid config ({detail})") from None


def check_weight_shapes(model: torch.nn.Module, weights_file: Path) -> None:
    """Compare the safetensors header with `model` (which may live on the meta device), naming the first
    missing, unexpected or mis-shaped tensor; reads no tensor data."""
    try:
        with safe_open(str(weights_file), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"{weights_file}: cannot read safetensors ({err})") from None
    expected = model.state_dict()
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in expected if k not in shapes and k not in tied]
    unexpected = [k for k in shapes if k not in expected]
    if missing:
        raise UserError(f"{weights_file}: missing tensor '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise UserError(f"{weights_file}: unexpected tensor '{unexpected[0]}' ({len(unexpected)} in all)")
    for key, shape in shapes.items():
        if shape != tuple(expected[key].shape):
            raise UserError(
                f"{weights_file}: tensor '{key}' has shape {shape} but config.json implies {tuple(expected[key].shape)}"
            )


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not (path / "config.json").exists()


def adapter_base(path: Path) -> Path:
    """The local base model directory a LoRA adapter directory names (as given, or relative to the adapter)."""
    data = read_json_object(path / "adapter_config.json")
    base = data.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}/adapter_config.json: field 'base_model_name_or_path' is missing; merge the "
                        f"adapter with `minimind convert BASE --merge-lora {path} --out DIR`")
    for candidate in (Path(base), path / base):
        if candidate.is_dir() and candidate.resolve() != path.resolve():
            return candidate
    raise UserError(f"{path}: an adapter of base model {base!r}, which is not a local model directory; merge it "
                    f"with `minimind convert BASE --merge-lora {path} --out DIR`")


def _adapter_chain(path: Path) -> Iterator[Path]:
    """`path`, then (while the last one is an adapter directory) its base, its base's base, ...; a cycle is
    refused. Lazy, so a caller that stops early never resolves the bases it does not need."""
    seen = {path.resolve()}
    yield path
    while is_adapter_dir(path):
        path = adapter_base(path)
        if path.resolve() in seen:
            raise UserError(f"{path}: adapters name each other as their base model (a cycle)")
        seen.add(path.resolve())
        yield path


def adapter_source(path: Path, files: tuple[str, ...]) -> Path:
    """`path`, or for an adapter directory without `files` the first base along its chain that has them (an
    adapter's tokenizer and generation_config.json are its base's)."""
    return next(p for p in _adapter_chain(path) if not is_adapter_dir(p) or all((p / f).is_file() for f in files))


def _merged_adapter_model(path: Path) -> MiniMindForCausalLM:
    """The model at the bottom of the adapter's chain of bases (float32, CPU) with every adapter on the way
    merged into its weights, the deepest first."""
    from minimind.lora import ADAPTER_WEIGHTS, merge_adapter, read_adapter

    *adapters, base = _adapter_chain(path)
    model = load_model(base)
    for adapter in reversed(adapters):
        config, tensors = read_adapter(adapter)
        merge_adapter(model, config, tensors, adapter / ADAPTER_WEIGHTS)
    return model


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> MiniMindForCausalLM:
    """Build the model from `path/config.json` and load `path/model.safetensors`, in eval mode (or, for a LoRA
    adapter directory, its base model with the adapter merged)."""
    path = Path(path)
    if is_adapter_dir(path):
        model = _merged_adapter_model(path).to(device)
        return (model.to(dtype) if dtype is not None else model).eval()
    config = load_config(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{path}: model.safetensors is missing")
    with torch.device("meta"):  # shapes only: a config that does not fit the weights allocates nothing
        check_weight_shapes(MiniMindForCausalLM(config), weights)
    model = MiniMindForCausalLM(config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UserError(f"{weights}: cannot read safetensors ({err})") from None
    model.load_state_dict(state, strict=False)  # complete: checked above (a tied head is not stored)
    model.name_or_path = config.name_or_path = str(path.resolve())  # PEFT records it as an adapter's base
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_model_dir(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """-> (model, tokenizer) from a model directory written by any stage."""
    from minimind.tokenizer import load_tokenizer

    path = Path(path)
    model = load_model(path, device, dtype)
    tokenizer = load_tokenizer(adapter_source(path, TOKENIZER_FILES))
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}"
        )
    return model, tokenizer


def save_model_dir(model: MiniMindForCausalLM, tokenizer, out_dir: str | Path) -> Path:
    """Write a complete model directory. Each file lands by atomic rename, so a crash never leaves a
    half-written model.safetensors behind; other files in `out_dir` (checkpoints, metrics) are left alone."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".save-", dir=out_dir))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        _write_generation_config(model.config, staging)
        if tokenizer is not None:
            _save_tokenizer_files(tokenizer, staging)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == "model.safetensors"):
            os.replace(item, out_dir / item.name)  # weights last: their presence means the rest is there
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_generation_config(config: MiniMindConfig, out_dir: Path) -> None:
    data = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        **GENERATION_DEFAULTS,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(data, indent=2) + "\n")


def _save_tokenizer_files(tokenizer, out_dir: Path) -> None:
    """Copy tokenizer files from where the tokenizer was loaded; else let it save itself."""
    source = getattr(tokenizer, "name_or_path", None)
    if source and all((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        for name in TOKENIZER_FILES:
            shutil.copyfile(Path(source) / name, out_dir / name)
        return
    tokenizer.save_pretrained(str(out_dir))

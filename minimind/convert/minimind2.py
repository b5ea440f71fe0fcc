"""Import MiniMind2 `.pth` state dicts (or the reference project's transformers-format directories) into a model
directory, and export back to a `.pth`.

    minimind convert full_sft_512.pth --from minimind2 --tokenizer TOKDIR --out runs/minimind2-small
    minimind convert MiniMind2-Small/ --from minimind2 --out runs/minimind2-small     # config.json + weights
    minimind convert runs/sft --to minimind2 --out runs/sft.pth

MiniMind2's own layout: `tok_embeddings.weight`, `layers.{i}.attention.wq/wk/wv/wo.weight`,
`layers.{i}.attention_norm.weight`, `layers.{i}.ffn_norm.weight`, `layers.{i}.feed_forward.w1/w2/w3.weight`
computing `w2(silu(w1 x) * w3 x)`, `norm.weight`, `output.weight` (tied to the embedding); MoE layers hold
`feed_forward.gate.weight`, `feed_forward.experts.{e}.w1/w2/w3.weight` and `feed_forward.shared_experts.w1...`
(one shared expert, a plain FeedForward) or `feed_forward.shared_experts.{s}.w1...` (several). Its RoPE is
the interleaved complex-number form, so q/k rows are permuted on the way in and back on the way out; the
round trip is bit-exact. Later releases of the reference project save `.pth` files with HF-style names
(`model.layers.{i}.self_attn.q_proj.weight`, ...) and rotate-half RoPE, i.e. exactly our layout; those are
recognised by their keys and imported without permutation.

The shapes give every size except the head count (and the experts per token), which come from `--preset`
(by default the preset whose width matches) or `--n-heads` / `--experts-per-tok`. A transformers-format
directory (`config.json` with `model_type` "minimind" and `model.safetensors` or `pytorch_model.bin`, HF-style
names) says them itself, with its `rope_theta`, `rms_norm_eps` and `max_position_embeddings`, and carries the
tokenizer; the flags still override it.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from minimind.convert.layout import (
    check_output_dir,
    fold_chat_template,
    interleaved_to_rotate_half,
    rotate_half_to_interleaved,
    stored_dtype,
    write_directory,
)
from minimind.errors import UserError
from minimind.model.configuration_minimind import PRESETS, MiniMindConfig
from minimind.model.modeling_minimind import MiniMindForCausalLM
from minimind.modeldir import load_model, read_json_object, save_model_dir

IMPORT_PRESETS = ("small", "base", "moe")
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")  # training checkpoints nest the weights
DERIVED_BUFFERS = {"pos_cis", "freqs_cos", "freqs_sin", "model.freqs_cos", "model.freqs_sin"}  # recomputed
ATTENTION = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
SWIGLU = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")
LAYER_INDEX = re.compile(r"(?:model\.)?layers\.(\d+)\.")


def legacy_name(key: str, single_shared: bool) -> str:
    """Our state-dict key -> MiniMind2's, e.g. model.layers.0.mlp.up_proj -> layers.0.feed_forward.w3."""
    top = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.weight",
        "lm_head.weight": "output.weight",
    }
    if key in top:
        return top[key]
    match = LAYER_KEY.fullmatch(key)
    if match is None:
        raise ValueError(f"not a MiniMind parameter name: {key}")
    layer, name = match.groups()
    if name in ATTENTION:
        return f"layers.{layer}.{ATTENTION[name]}.weight"
    parts = name.split(".")[1:]  # drop "mlp"
    if single_shared and parts[0] == "shared_experts":
        parts = parts[:1] + parts[2:]  # MiniMind2 keeps one shared expert as a module, not a list
    parts[-1] = SWIGLU.get(parts[-1], parts[-1])
    return f"layers.{layer}.feed_forward.{'.'.join(parts)}.weight"


def load_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """A `.pth` file's state dict (plain, or nested under 'model'/'state_dict'), loaded with weights_only."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected a .pth file")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"{path}: not a PyTorch state dict loadable with weights_only=True ({first_line})"
        ) from None
    if isinstance(obj, dict):
        for wrapper in WRAPPER_KEYS:
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise UserError(
            f"{path}: not a state dict (expected a non-empty dict of tensors, got {type(obj).__name__})"
        )
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(
                f"{path}: not a state dict (key {key!r} holds a {type(value).__name__}, not a tensor)"
            )
    for prefix in ("module.", "_orig_mod."):  # saved from a DDP- or torch.compile-wrapped model
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if k not in DERIVED_BUFFERS}


HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# config.json field of the reference project's transformers format -> our MiniMindConfig field
HF_FIELDS = {"rope_theta": "rope_theta", "rms_norm_eps": "norm_eps", "max_position_embeddings": "max_seq_len"}


def load_hf_dir(path: Path, model_types: tuple[str, ...] = ("minimind",)) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config.json) of a transformers directory whose model_type is one of `model_types` (by
    default the reference project's own format)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: a directory without config.json; expected a .pth file or a transformers "
                        "directory (config.json + model.safetensors)")
    config = read_json_object(config_file)
    if config.get("model_type") not in model_types:
        expected = " or ".join(repr(t) for t in model_types)
        raise UserError(f"{config_file}: model_type is {config.get('model_type')!r}, expected {expected}")
    if "dim" in config and "hidden_size" not in config:  # our own field names
        raise UserError(f"{path}: already a model directory of this project (config.json has 'dim'); use it as "
                        "it is, no import needed")
    return read_hf_weights(path), config


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a transformers-format directory: `model.safetensors` (or the shards its
    `model.safetensors.index.json` lists) or `pytorch_model.bin`, derived RoPE buffers dropped."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    weights = next((path / name for name in HF_WEIGHTS if (path / name).is_file()), None)
    if weights is None and index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: field 'weight_map' is missing or empty")
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
    elif weights is None:
        raise UserError(f"{path}: no {' or '.join(HF_WEIGHTS)} beside config.json")
    elif weights.suffix != ".safetensors":
        return load_pth(weights)
    else:
        shards = [weights]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        if not shard.is_file():
            raise UserError(f"{index}: lists shard {shard.name}, which is missing")
        try:
            state |= load_file(shard)
        except (SafetensorError, OSError) as err:
            raise UserError(f"{shard}: not a readable safetensors file ({err})") from None
    return {k: v for k, v in state.items() if k not in DERIVED_BUFFERS}


def is_hf_layout(state: dict[str, torch.Tensor]) -> bool:
    """True for the reference project's later HF-style names (our own layout); False for MiniMind2's."""
    return "model.embed_tokens.weight" in state and "tok_embeddings.weight" not in state


def infer_config(
    state: dict[str, torch.Tensor],
    path: str | Path,
    preset: str | None = None,
    n_heads: int | None = None,
    experts_per_tok: int | None = None,
    extra: dict | None = None,
) -> MiniMindConfig:
    """The config whose shapes are the state dict's; head count and top-k from the preset or the overrides;
    `extra` adds fields the shapes cannot tell (rope_theta, ...)."""
    hf = is_hf_layout(state)
    single_shared = not hf and "layers.0.feed_forward.shared_experts.w1.weight" in state

    def name(ours: str) -> str:
        return ours if hf else legacy_name(ours, single_shared)

    def shape(ours: str) -> tuple[int, ...]:
        key = name(ours)
        if key not in state:
            raise UserError(f"{path}: missing key '{key}'")
        return tuple(state[key].shape)

    vocab_size, dim = shape("model.embed_tokens.weight")
    layer_ids = {int(m.group(1)) for k in state if (m := LAYER_INDEX.match(k))}
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    if n_layers == 0:
        raise UserError(f"{path}: missing key '{name('model.layers.0.self_attn.q_proj.weight')}'")
    if preset is None and n_heads is None:
        preset = next((p for p in IMPORT_PRESETS if PRESETS[p]["dim"] == dim), None)
        if preset is None:
            raise UserError(
                f"{path}: width {dim} matches no preset ({', '.join(IMPORT_PRESETS)}); pass --n-heads"
            )
    if preset is not None and PRESETS[preset]["dim"] != dim:
        raise UserError(
            f"--preset {preset} has dim {PRESETS[preset]['dim']} but {name('model.embed_tokens.weight')} has "
            f"width {dim}; pass the matching preset or --n-heads"
        )
    fields = dict(PRESETS[preset]) if preset else {}
    n_heads = n_heads or fields["n_heads"]
    if dim % n_heads:
        raise UserError(f"--n-heads {n_heads} does not divide the model width {dim}")
    kv_dim = shape("model.layers.0.self_attn.k_proj.weight")[0]
    head_dim = dim // n_heads
    if kv_dim % head_dim:
        raise UserError(
            f"{path}: {name('model.layers.0.self_attn.k_proj.weight')} has {kv_dim} rows, not a "
            f"multiple of the head size {head_dim} (dim {dim} / {n_heads} heads); check --n-heads"
        )
    use_moe = name("model.layers.0.mlp.gate.weight") in state
    moe: dict = {}
    if use_moe:
        shared_prefix = ("model.layers.0.mlp" if hf else "layers.0.feed_forward") + ".shared_experts."
        shared_ids = {k[len(shared_prefix) :].split(".")[0] for k in state if k.startswith(shared_prefix)}
        n_shared = 1 if single_shared else len(shared_ids)
        moe = dict(
            n_routed_experts=shape("model.layers.0.mlp.gate.weight")[0],
            n_shared_experts=n_shared,
            num_experts_per_tok=experts_per_tok or fields.get("num_experts_per_tok", 2),
        )
        hidden_dim = shape("model.layers.0.mlp.experts.0.gate_proj.weight")[0]
    else:
        hidden_dim = shape("model.layers.0.mlp.gate_proj.weight")[0]
    try:
        return MiniMindConfig(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=kv_dim // head_dim,
            vocab_size=vocab_size,
            hidden_dim=hidden_dim,
            use_moe=use_moe,
            **moe,
            **(extra or {}),
        )
    except ValueError as err:
        raise UserError(f"{path}: the shapes give an invalid config: {err}") from None


def to_our_state(
    state: dict[str, torch.Tensor], config: MiniMindConfig, path: str | Path
) -> dict[str, torch.Tensor]:
    """Rename (and for MiniMind2's layout, un-interleave q/k rows), checking every key and shape first."""
    hf = is_hf_layout(state)
    single_shared = (
        not hf
        and config.use_moe
        and config.n_shared_experts == 1
        and "layers.0.feed_forward.shared_experts.w1.weight" in state
    )
    with torch.device("meta"):
        expected = MiniMindForCausalLM(config).state_dict()
    expected.pop("lm_head.weight")
    names = {k: (k if hf else legacy_name(k, single_shared)) for k in expected}
    head = "lm_head.weight" if hf else "output.weight"
    missing = [n for n in names.values() if n not in state]
    if missing:
        raise UserError(f"{path}: missing key '{missing[0]}' ({len(missing)} missing in all)")
    extra = [k for k in state if k not in names.values() and k != head]
    if extra:
        raise UserError(f"{path}: unexpected key '{extra[0]}' ({len(extra)} unexpected in all)")
    ours = {}
    for key, theirs in names.items():
        tensor = state[theirs]
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise UserError(
                f"{path}: key '{theirs}' has shape {tuple(tensor.shape)}, expected "
                f"{tuple(expected[key].shape)} from the inferred config"
            )
        if not tensor.is_floating_point():
            raise UserError(f"{path}: key '{theirs}' has dtype {tensor.dtype}, expected floating point")
        if not hf and key.endswith("q_proj.weight"):
            tensor = interleaved_to_rotate_half(tensor, config.n_heads)
        elif not hf and key.endswith("k_proj.weight"):
            tensor = interleaved_to_rotate_half(tensor, config.n_kv_heads)
        ours[key] = tensor
    embed = state[names["model.embed_tokens.weight"]]
    if head in state and not torch.equal(state[head].to(embed.dtype), embed):
        raise UserError(
            f"{path}: '{head}' differs from '{names['model.embed_tokens.weight']}'; MiniMind ties "
            "the output head to the embedding"
        )
    return ours


def import_minimind2(
    pth: str | Path,
    tokenizer_dir: str | Path | None,
    out_dir: str | Path,
    preset: str | None = None,
    n_heads: int | None = None,
    experts_per_tok: int | None = None,
) -> MiniMindConfig:
    """Write a model directory at `out_dir`: weights in the source's dtype, tokenizer from `tokenizer_dir`.

    `pth` is a `.pth` file or a reference-project transformers directory, whose config.json gives the head
    count and the rest (unless `preset`/`n_heads`/`experts_per_tok` say otherwise) and whose tokenizer is
    used when `tokenizer_dir` is None."""
    source, extra = Path(pth), {}
    if tokenizer_dir is None and not source.is_dir():
        raise UserError("--from minimind2 needs --tokenizer DIR (a .pth holds no tokenizer)")
    if source.is_dir():
        state, hf_config = load_hf_dir(source)
        if preset is None:
            n_heads = n_heads or hf_config.get("num_attention_heads")
        experts_per_tok = experts_per_tok or hf_config.get("num_experts_per_tok")
        extra = {ours: hf_config[theirs] for theirs, ours in HF_FIELDS.items() if hf_config.get(theirs) is not None}
        tokenizer_dir = tokenizer_dir or source
        if hf_config.get("inference_rope_scaling"):
            warnings.warn(f"{source}/config.json turns on the reference project's YaRN for inference "
                          "(inference_rope_scaling); the import leaves it off (its attention factor is not ours)",
                          stacklevel=2)
    else:
        state = load_pth(pth)
    out_dir = check_output_dir(out_dir)
    refuse_qk_norm(state, pth)
    config = infer_config(state, pth, preset, n_heads, experts_per_tok, extra)
    save_imported(to_our_state(state, config, pth), config, load_source_tokenizer(tokenizer_dir), out_dir)
    return config


def refuse_qk_norm(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """A checkpoint with QK-norm weights is minimind-3's (or Qwen3's), which `--from minimind2` cannot read."""
    key = next((k for k in state if k.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight"))), None)
    if key is not None:
        raise UserError(f"{path}: holds '{key}' (QK-norm), a minimind-3 checkpoint, not MiniMind2; use "
                        "--from minimind3")


def load_source_tokenizer(tokenizer_dir: str | Path):
    """The tokenizer to put beside imported weights."""
    from minimind.tokenizer import load_tokenizer

    with warnings.catch_warnings():  # AutoTokenizer reads a source directory's config.json, whose legacy
        warnings.simplefilter("ignore", FutureWarning)  # `rope_scaling: null` transformers 5 warns about
        return load_tokenizer(tokenizer_dir)


def save_imported(ours: dict[str, torch.Tensor], config: MiniMindConfig, tokenizer, out_dir: str | Path) -> None:
    """Write the checked state dict (our names) with `tokenizer` (from `load_source_tokenizer`) as a model
    directory at `out_dir`, in the weights' dtype; built beside `out_dir` and renamed into place, so a failure
    leaves nothing."""
    if len(tokenizer) > config.vocab_size:
        raise UserError(
            f"{tokenizer.name_or_path}: the tokenizer has {len(tokenizer)} tokens but the checkpoint's "
            f"embedding has {config.vocab_size} rows"
        )
    model = MiniMindForCausalLM(config).to(ours["model.embed_tokens.weight"].dtype)
    model.load_state_dict(ours, strict=False)
    model.tie_weights()

    def fill(staging: Path) -> None:
        save_model_dir(model.eval(), tokenizer, staging)
        fold_chat_template(Path(tokenizer.name_or_path), staging)

    write_directory(out_dir, fill)


def to_minimind2_state(model: MiniMindForCausalLM) -> dict[str, torch.Tensor]:
    """Our weights under MiniMind2's names, q/k rows interleaved, `output.weight` a copy of the embedding."""
    config = model.config
    single_shared = config.use_moe and config.n_shared_experts == 1
    state = {}
    for key, tensor in model.state_dict().items():
        if key.endswith("q_proj.weight"):
            tensor = rotate_half_to_interleaved(tensor, config.n_heads)
        elif key.endswith("k_proj.weight"):
            tensor = rotate_half_to_interleaved(tensor, config.n_kv_heads)
        state[legacy_name(key, single_shared)] = tensor.detach().contiguous().clone()
    return state


def export_minimind2(model_dir: str | Path, out_file: str | Path) -> Path:
    """Write `model_dir` as a MiniMind2 `.pth` state dict (plain tensors, in the weights' saved dtype)."""
    model = load_model(model_dir, dtype=stored_dtype(model_dir))
    if model.config.qk_norm:
        raise UserError(f"{model_dir}: config field 'qk_norm' is true (a minimind-3 model), which MiniMind2 cannot "
                        "hold; use --to minimind3")
    config = model.config
    if config.use_moe and config.moe_intermediate_size != config.hidden_dim:
        raise UserError(f"{model_dir}: the routed experts are {config.moe_intermediate_size} wide and the shared "
                        f"ones {config.hidden_dim}; MiniMind2's MoE has one width for both")
    return write_pth(to_minimind2_state(model), out_file)


def write_pth(state: dict[str, torch.Tensor], out_file: str | Path) -> Path:
    """torch.save `state` to `out_file` through a partial file renamed into place (never half a file)."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(f".{out_file.name}.partial")
    try:
        with open(partial, "wb") as handle:  # a file object: a full disk is OSError(ENOSPC), not "unexpected pos"
            torch.save(state, handle)
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)
    return out_file

"""`--to gguf`: the file, read back with the gguf package's reader, holds exactly our model and tokenizer."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
import torch
from convert_helpers import random_model_dir

from minimind.convert.gguf import export_gguf, gguf_tensor_names
from minimind.convert.layout import interleaved_to_rotate_half, rotate_half_to_interleaved
from minimind.errors import UserError
from minimind.modeldir import load_model


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def values_of(tensor) -> torch.Tensor:
    """A GGUF tensor as fp32 in our layout's row order (quantised ones dequantised)."""
    data = tensor.data
    if tensor.tensor_type in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        data = gguf.quants.dequantize(data, tensor.tensor_type)
    return torch.from_numpy(np.array(data, dtype=np.float32))


def ours_in_gguf_order(key: str, weight: torch.Tensor, config) -> torch.Tensor:
    if key.endswith("q_proj.weight"):
        return rotate_half_to_interleaved(weight, config.n_heads)
    if key.endswith("k_proj.weight"):
        return rotate_half_to_interleaved(weight, config.n_kv_heads)
    return weight


def test_rope_permutations_are_inverse_and_pair_the_right_rows():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)  # 2 heads of size 8
    inter = rotate_half_to_interleaved(w, 2)
    assert torch.equal(interleaved_to_rotate_half(inter, 2), w)
    # head 1, rotate-half pair (i, i + 4) for i = 1 -> interleaved rows (2, 3) of that head
    assert torch.equal(inter[8 + 2], w[8 + 1]) and torch.equal(inter[8 + 3], w[8 + 1 + 4])


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0", "q4_0"])
def test_tensors_read_back_equal_the_model_weights(tmp_path, tokenizer, dtype):
    source = random_model_dir(tmp_path / "src", tokenizer)
    out = export_gguf(source, tmp_path / "m.gguf", dtype)
    fields, tensors = read(out)
    model = load_model(source)
    config, state = model.config, model.state_dict()
    names = gguf_tensor_names(config)
    assert set(tensors) == set(names.values())  # the tied output head is left to llama.cpp's fallback
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[dtype]
    for key, name in names.items():
        tensor, weight = tensors[name], state[key]
        assert [int(n) for n in tensor.shape] == list(
            reversed(weight.shape)
        )  # GGUF lists ne0 (columns) first
        expected = ours_in_gguf_order(key, weight, config)
        got = values_of(tensor)
        if dtype == "f32" or weight.ndim == 1:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and torch.equal(got, expected), name
        elif dtype == "f16":
            assert torch.equal(got, expected.half().float()), name
        elif dtype == "q4_0":
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0
            # Q4_0: blocks of 32 share d = (value of largest magnitude) / -8 in f16 and codes run from -8 to 7,
            # so a value is off by half a step d, one step at +8 d (clamped to 7 d)
            step = expected.abs().view(-1, 32).amax(dim=1, keepdim=True) / 8
            error = (got.view(-1, 32) - expected.view(-1, 32)).abs()
            assert (error <= 1.01 * step).all() and (error.mean() < 0.3 * step.mean()), name
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
            # Q8_0: blocks of 32 share one scale d = max|x|/127 stored in f16, so each value is off by half a
            # step plus the scale's rounding (at most 127·d·2^-11 < 0.07·d)
            step = expected.abs().view(-1, 32).amax(dim=1, keepdim=True) / 127
            error = (got.view(-1, 32) - expected.view(-1, 32)).abs()
            assert (error <= 0.57 * step).all(), name


def test_metadata_describes_the_model_and_embeds_the_tokenizer(tmp_path, tokenizer, tokenizer_dir):
    source = random_model_dir(
        tmp_path / "src", tokenizer, max_seq_len=128, yarn_factor=4.0, yarn_original_max_seq_len=32
    )
    fields, _ = read(export_gguf(source, tmp_path / "m.gguf", "f16"))
    config = load_model(source).config
    assert fields["general.architecture"] == "llama"
    expected = {
        "llama.context_length": 128,
        "llama.embedding_length": config.dim,
        "llama.block_count": config.n_layers,
        "llama.feed_forward_length": config.hidden_dim,
        "llama.attention.head_count": config.n_heads,
        "llama.attention.head_count_kv": config.n_kv_heads,
        "llama.rope.dimension_count": config.head_dim,
        "llama.rope.freq_base": 1e6,
        "llama.rope.scaling.type": "yarn",
        "llama.rope.scaling.factor": 4.0,
        "llama.rope.scaling.original_context_length": 32,
        "llama.rope.scaling.attn_factor": 1.0,  # llama.cpp's own 0.1·ln(factor) + 1 is our default recipe
    }
    assert {k: fields[k] for k in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.norm_eps)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    merges = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
    ids = {k: fields[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding")}
    assert ids == {"bos": 1, "eos": 2, "unknown": 0, "padding": 0}
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template


def test_a_set_yarn_attention_factor_is_written_relative_to_llama_cpps_own(tmp_path, tokenizer):
    # minimind-3 sets attention_factor 1.0: llama.cpp multiplies attn_factor by 0.1·ln(4) + 1, so it gets 1/that
    source = random_model_dir(tmp_path / "src", tokenizer, qk_norm=True, max_seq_len=128, yarn_factor=4.0,
                              yarn_original_max_seq_len=32, yarn_attention_factor=1.0)
    fields, _ = read(export_gguf(source, tmp_path / "m.gguf", "f32"))
    assert fields["qwen3.rope.scaling.attn_factor"] == pytest.approx(1 / (0.1 * math.log(4.0) + 1), rel=1e-6)
    plain = random_model_dir(tmp_path / "plain", tokenizer)
    fields, _ = read(export_gguf(plain, tmp_path / "plain.gguf", "f32"))
    assert not [k for k in fields if ".rope.scaling." in k]  # no YaRN: no scaling keys at all


def test_vocabulary_rows_beyond_the_tokenizer_are_padded(tmp_path, tokenizer):
    source = random_model_dir(tmp_path / "src", tokenizer, vocab_size=520)
    fields, tensors = read(export_gguf(source, tmp_path / "m.gguf", "f32"))
    assert len(fields["tokenizer.ggml.tokens"]) == 520 == int(tensors["token_embd.weight"].shape[1])
    assert fields["tokenizer.ggml.tokens"][515] == "[PAD515]"
    assert fields["tokenizer.ggml.token_type"][515] == gguf.TokenType.UNUSED


def test_moe_and_unsupported_tokenizers_are_refused_by_name(tmp_path, tokenizer):
    moe = random_model_dir(tmp_path / "moe", tokenizer, use_moe=True)
    with pytest.raises(UserError, match="use_moe.*--to llama"):
        export_gguf(moe, tmp_path / "moe.gguf")
    dense = random_model_dir(tmp_path / "dense", tokenizer)
    with pytest.raises(UserError, match="--dtype 'q4'"):
        export_gguf(dense, tmp_path / "x.gguf", "q4")
    data = json.loads((dense / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (dense / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="tokenizer.json: field 'pre_tokenizer'"):
        export_gguf(dense, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".*partial"))


def test_minimind2_tokenizer_embeds(tmp_path, minimind2_tokenizer_dir):
    """A tokenizer like MiniMind2's (6400 tokens, 6141 merges, a chat template of its own) embeds whole."""
    from conftest import tiny_model

    from minimind.modeldir import save_model_dir
    from minimind.tokenizer import load_tokenizer

    tok = load_tokenizer(minimind2_tokenizer_dir)
    source = save_model_dir(tiny_model(vocab_size=6400), tok, tmp_path / "src")
    fields, _ = read(export_gguf(source, tmp_path / "m.gguf", "q8_0"))
    assert fields["tokenizer.ggml.tokens"] == tok.convert_ids_to_tokens(list(range(6400)))
    merges = json.loads((minimind2_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert len(fields["tokenizer.ggml.merges"]) == len(merges) == 6141


def test_q4_0_leaves_rows_that_are_not_whole_blocks_in_f16(tmp_path, tokenizer):
    """dim 48: every matrix with rows of 48 values stays f16; the down projection (rows of 128) is q4_0."""
    source = random_model_dir(tmp_path / "src", tokenizer, dim=48, hidden_dim=128)
    _, tensors = read(export_gguf(source, tmp_path / "m.gguf", "q4_0"))
    types = {name: tensor.tensor_type for name, tensor in tensors.items()}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32

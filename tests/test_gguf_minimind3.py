"""`--to gguf` for QK-norm models (llama.cpp's qwen3 / qwen3moe) and the Ollama Modelfile beside every export."""

from __future__ import annotations

import json
import re

import gguf
import pytest
import torch
from test_convert_gguf import read, values_of
from test_minimind3_model import tiny3
from test_minimind3_template import minimind3_tokenizer

from minimind.cli import main
from minimind.convert.gguf import export_gguf, gguf_tensors
from minimind.errors import UserError
from minimind.modeldir import save_model_dir
from minimind.tokenizer.template import DEFAULT_SYSTEM_PROMPT


@pytest.fixture(scope="module")
def tokenizer3(tmp_path_factory, corpus_file):
    """A tiny tokenizer of minimind-3's format (ChatML with <think>)."""
    return minimind3_tokenizer(tmp_path_factory.mktemp("tokenizer3"), corpus_file)


def export(tmp_path, preset: str, tokenizer, dtype: str = "f32", **overrides):
    """A tiny randomized `preset` model saved with `tokenizer` and exported; -> (model, fields, tensors)."""
    model = tiny3(preset, **overrides)
    source = save_model_dir(model, tokenizer, tmp_path / "src")
    fields, tensors = read(export_gguf(source, tmp_path / "out" / "m.gguf", dtype))
    return model, fields, tensors


def expected_names(n_layers: int, moe: bool) -> set[str]:
    ffn = ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"] if moe else ["ffn_gate", "ffn_up",
                                                                                           "ffn_down"]
    block = ["attn_norm", "attn_q", "attn_q_norm", "attn_k", "attn_k_norm", "attn_v", "attn_output", "ffn_norm", *ffn]
    return {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{b}.weight" for i in range(n_layers) for b in block}


def test_dense_qk_norm_model_is_qwen3_with_unpermuted_rows(tmp_path, tokenizer3):
    model, fields, tensors = export(tmp_path, "minimind3", tokenizer3)
    config, state = model.config, model.state_dict()
    assert fields["general.architecture"] == "qwen3"
    expected = {"qwen3.embedding_length": 64, "qwen3.block_count": 2, "qwen3.feed_forward_length": 96,
                "qwen3.attention.head_count": 4, "qwen3.attention.head_count_kv": 2,
                "qwen3.attention.key_length": 24, "qwen3.attention.value_length": 24,
                "qwen3.rope.dimension_count": 24, "qwen3.rope.freq_base": 1e6, "qwen3.context_length": 512}
    assert {k: fields[k] for k in expected} == expected
    assert fields["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert set(tensors) == expected_names(config.n_layers, moe=False)
    for name, (key,) in gguf_tensors(config).items():
        # qwen3 rotates halves like we do (llama.cpp's NEOX RoPE): every tensor is ours as it is
        assert torch.equal(values_of(tensors[name]), state[key]), name
    assert [int(n) for n in tensors["blk.0.attn_q_norm.weight"].shape] == [24]
    assert [int(n) for n in tensors["blk.0.attn_q.weight"].shape] == [64, 4 * 24]  # ne0 (columns) first


def test_moe_without_shared_experts_is_qwen3moe_with_stacked_experts(tmp_path, tokenizer3):
    model, fields, tensors = export(tmp_path, "minimind3-moe", tokenizer3, dtype="q8_0")
    config, state = model.config, model.state_dict()
    assert fields["general.architecture"] == "qwen3moe"
    expected = {"qwen3moe.expert_count": 4, "qwen3moe.expert_used_count": 1,
                "qwen3moe.expert_feed_forward_length": 96, "qwen3moe.attention.key_length": 24}
    assert {k: fields[k] for k in expected} == expected
    assert set(tensors) == expected_names(config.n_layers, moe=True)
    router = tensors["blk.1.ffn_gate_inp.weight"]
    assert router.tensor_type == gguf.GGMLQuantizationType.F32  # llama.cpp keeps the router in float
    assert torch.equal(values_of(router), state["model.layers.1.mlp.gate.weight"])
    for ours, theirs in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
        tensor = tensors[f"blk.1.{theirs}.weight"]
        stacked = torch.stack([state[f"model.layers.1.mlp.experts.{e}.{ours}.weight"] for e in range(4)])
        assert [int(n) for n in tensor.shape] == list(reversed(stacked.shape))  # (E, out, in) -> ne (in, out, E)
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
        error = (values_of(tensor).view(stacked.shape) - stacked).abs().max()
        assert error <= stacked.abs().max() / 127, theirs  # within a Q8_0 step


@pytest.mark.parametrize("overrides, field", [(dict(n_shared_experts=1), "n_shared_experts"),
                                              (dict(norm_top1_prob=False), "norm_topk_prob"),
                                              (dict(qk_norm=False), "use_moe")])
def test_moe_shapes_llama_cpp_cannot_compute_are_refused_by_field(tmp_path, tokenizer3, overrides, field):
    with pytest.raises(UserError, match=field):
        export(tmp_path, "minimind3-moe", tokenizer3, **overrides)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def blocks_balance(template: str) -> bool:
    """Every `if`/`range` action of a Go template closed by an `end`, never more ends than openings."""
    depth = 0
    for action in re.findall(r"{{-?\s*(if|range|end|else)\b", template):
        depth += {"if": 1, "range": 1, "end": -1}.get(action, 0)
        if depth < 0:
            return False
    return depth == 0


def modelfile(path):
    """(TEMPLATE text, PARAMETER lines) of a Modelfile, checking its FROM line names the GGUF beside it."""
    text = (path / "Modelfile").read_text(encoding="utf-8")
    assert text.startswith("FROM ./m.gguf\n") and (path / "m.gguf").is_file()
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    assert blocks_balance(template)
    return template, [line for line in text.splitlines() if line.startswith("PARAMETER ")]


def test_minimind3_modelfile_speaks_chatml_with_the_thinking_switch(tmp_path, tokenizer3):
    export(tmp_path, "minimind3", tokenizer3)
    template, parameters = modelfile(tmp_path / "out")
    assert parameters == ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|im_start|>"',
                          "PARAMETER temperature 0.85", "PARAMETER top_p 0.85"]
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n" in template
    assert "<|im_start|>assistant\n<think>\n{{ .Thinking }}\n</think>\n\n{{ .Content }}" in template
    # the generation prompt: an open <think> with thinking on, the empty block the template writes without
    assert template.endswith("<|im_start|>assistant\n{{ if $.Think }}<think>\n{{ else }}<think>\n\n</think>\n\n"
                             "{{ end }}{{ end }}")
    assert "\n<tool_response>\n{{ .Content }}\n</tool_response>" in template
    # the tools preamble in minimind-3's own words, taken from the tokenizer's template
    tools = tokenizer3.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                           tools=[{"type": "function", "function": {"name": "f"}}])
    intro = tools.split("<|im_start|>system\n")[1].split("\n{")[0]
    assert intro.startswith("# Tools") and intro in template and "</tool_call>{{ end }}<|im_end|>" in template


def test_our_modelfile_uses_our_markers_default_system_prompt_and_greedy_when_asked(tmp_path, tokenizer):
    source = save_model_dir(tiny3(qk_norm=False, head_dim=16), tokenizer, tmp_path / "src")
    generation = json.loads((source / "generation_config.json").read_text())
    (source / "generation_config.json").write_text(json.dumps({**generation, "do_sample": False}))
    assert main(["convert", str(source), "--to", "gguf", "--out", str(tmp_path / "out" / "m.gguf")]) == 0
    assert read(tmp_path / "out" / "m.gguf")[0]["general.architecture"] == "llama"
    template, parameters = modelfile(tmp_path / "out")
    assert parameters == ['PARAMETER stop "</s>"', 'PARAMETER stop "<s>"', "PARAMETER temperature 0"]
    assert template.startswith("<s>system\n{{ if .System }}{{ .System }}{{ else }}" + DEFAULT_SYSTEM_PROMPT)
    assert "<s>{{ .Role }}\n{{ .Content }}" in template and template.endswith("<s>assistant\n{{ end }}")
    assert "\n\n# Tools\n\n" in template and "<tool_call>\n{\"name\": \"{{ $call.Function.Name }}\"" in template

"""`--to llama`: a plain HF directory that loads with no remote code and computes our function."""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import random_ids, random_model_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from minimind.convert.llama import export_llama
from minimind.errors import UserError
from minimind.modeldir import load_model


def load_plain(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()  # no trust_remote_code on purpose


def assert_same_logits(ours, theirs, ids, attention_mask=None):
    """Equal within 1e-5 at every real token (what pad positions output is each library's own business)."""
    with torch.no_grad():
        a = ours(ids, attention_mask=attention_mask).logits
        b = theirs(ids, attention_mask=attention_mask).logits
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


def test_dense_export_is_plain_llama_with_equal_logits_and_greedy_text(tmp_path, tokenizer):
    source = random_model_dir(tmp_path / "src", tokenizer)
    assert export_llama(source, tmp_path / "llama") == "LlamaForCausalLM"
    out = tmp_path / "llama"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert "auto_map" not in config and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 1e6 and config["rope_parameters"]["rope_type"] == "default"
    ours, llama = load_model(source), load_plain(out)
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()  # re-tied on load
    ids = random_ids(3, 20)
    assert_same_logits(ours, llama, ids)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding goes through both implementations' masking and position logic
    assert_same_logits(ours, llama, ids, mask)
    prompt = random_ids(1, 6, seed=1)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), llama.generate(prompt, **kwargs))


def test_exported_tokenizer_keeps_the_chat_template(tmp_path, tokenizer):
    source = random_model_dir(tmp_path / "src", tokenizer)
    export_llama(source, tmp_path / "llama")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "llama")
    messages = [{"role": "user", "content": "你好, MiniMind"}]
    assert theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert theirs("12 plus 30").input_ids == tokenizer("12 plus 30").input_ids


def test_config_also_carries_the_legacy_rope_fields(tmp_path, tokenizer):
    """Older transformers and vLLM read rope_theta/rope_scaling; transformers 5 reads rope_parameters."""
    source = random_model_dir(
        tmp_path / "src", tokenizer, max_seq_len=32, yarn_factor=4.0, yarn_original_max_seq_len=32
    )
    export_llama(source, tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    yarn = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    assert config["rope_scaling"] == yarn and config["rope_parameters"] == {**yarn, "rope_theta": 1e6}
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}  # what an older reader understands
    assert LlamaConfig(**legacy).rope_parameters == {**yarn, "rope_theta": 1e6}


def test_yarn_model_matches_beyond_its_trained_length(tmp_path, tokenizer):
    source = random_model_dir(
        tmp_path / "src", tokenizer, max_seq_len=128, yarn_factor=4.0, yarn_original_max_seq_len=32
    )
    export_llama(source, tmp_path / "llama")
    assert_same_logits(load_model(source), load_plain(tmp_path / "llama"), random_ids(1, 100))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(n_shared_experts=2),
        dict(n_shared_experts=0, num_experts_per_tok=1),
        dict(num_experts_per_tok=1, n_routed_experts=3),
        dict(norm_topk_prob=False),
    ],
    ids=["1-shared", "2-shared", "no-shared-top1", "top1", "unnormalised"],
)
def test_moe_export_is_qwen2_moe_with_equal_logits(tmp_path, tokenizer, overrides):
    source = random_model_dir(tmp_path / "src", tokenizer, use_moe=True, **overrides)
    assert export_llama(source, tmp_path / "hf") == "Qwen2MoeForCausalLM"
    assert not list((tmp_path / "hf").glob("*.py"))
    theirs = load_plain(tmp_path / "hf")
    assert type(theirs).__name__ == "Qwen2MoeForCausalLM"
    ours = load_model(source)
    assert_same_logits(ours, theirs, random_ids(3, 24))
    prompt = random_ids(1, 5, seed=2)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, **kwargs), theirs.generate(prompt, **kwargs))


def test_moe_checkpoint_uses_the_released_per_expert_layout(tmp_path, tokenizer):
    from safetensors import safe_open

    source = random_model_dir(tmp_path / "src", tokenizer, use_moe=True)
    export_llama(source, tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        assert torch.count_nonzero(handle.get_tensor("model.layers.0.mlp.shared_expert_gate.weight")) == 0
        assert torch.count_nonzero(handle.get_tensor("model.layers.1.self_attn.q_proj.bias")) == 0
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in keys and "lm_head.weight" not in keys


def test_weights_keep_their_saved_dtype(tmp_path, tokenizer):
    from conftest import tiny_model
    from convert_helpers import randomize
    from safetensors import safe_open

    from minimind.modeldir import save_model_dir

    source = save_model_dir(randomize(tiny_model()).half(), tokenizer, tmp_path / "src")
    export_llama(source, tmp_path / "llama")
    with safe_open(str(tmp_path / "llama" / "model.safetensors"), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["torch_dtype"] == "float16"
    assert_same_logits(load_model(source), load_plain(tmp_path / "llama").float(), random_ids())


def test_refuses_a_non_empty_output_directory(tmp_path, tokenizer):
    source = random_model_dir(tmp_path / "src", tokenizer)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "modeling_minimind.py").write_text("# stale remote code\n")
    with pytest.raises(UserError, match="not an empty directory"):
        export_llama(source, tmp_path / "busy")

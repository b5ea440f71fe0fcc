"""`--merge-lora`: adapters written by the real `peft` package merge into logits equal to PEFT's own."""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import random_ids, random_model_dir
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from minimind.convert.lora_merge import merge_adapter_dir
from minimind.errors import UserError
from minimind.lora import load_peft_adapter
from minimind.modeldir import load_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir, adapter_dir, seed=0, **lora):
    """A PEFT adapter with non-zero B (PEFT initialises B to 0, which would make any merge pass)."""
    peft_model = get_peft_model(load_model(base_dir), LoraConfig(**{"r": 8, "lora_alpha": 16, **lora}))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    peft_model.save_pretrained(adapter_dir)
    return peft_model.eval()


def assert_equal_in_float64(merged_dir, peft_model, ids):
    """(W + s·BA)x against Wx + s·B(Ax) in float64, where only the merged weights' fp32 storage rounds;
    in fp32 the two summation orders alone differ by ~1e-5 on the MoE model's large random activations."""
    with torch.no_grad():
        merged = load_model(merged_dir).double()(ids).logits
        expected = peft_model.double()(ids).logits
        peft_model.float()
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "lora",
    [
        dict(target_modules=ALL_LINEAR),
        dict(target_modules=["q_proj", "v_proj"], use_rslora=True, lora_alpha=32),
        dict(target_modules=ALL_LINEAR, rank_pattern={"down_proj": 4}, alpha_pattern={r"layers\.1\..*": 5}),
    ],
    ids=["all-linear", "rslora", "rank-and-alpha-patterns"],
)
def test_merged_logits_equal_peft_logits(tmp_path, tokenizer, lora):
    base = random_model_dir(tmp_path / "base", tokenizer)
    peft_model = make_adapter(base, tmp_path / "adapter", **lora)
    n = merge_adapter_dir(base, tmp_path / "adapter", tmp_path / "merged")
    assert n == 2 * len(lora["target_modules"])
    ids = random_ids(2, 16)
    with torch.no_grad():
        expected = peft_model(ids).logits
        merged = load_model(tmp_path / "merged")(ids).logits
        before = load_model(base)(ids).logits
    # fp32: the two summation orders alone differ by about 1e-5; the float64 check is the tight one
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    assert_equal_in_float64(tmp_path / "merged", peft_model, ids)
    assert (merged - before).abs().max() > 1e-2  # the adapter really changed the function
    with torch.no_grad():  # the same reader wrapping the layers instead of merging: PEFT's function too
        wrapped = load_peft_adapter(load_model(base), tmp_path / "adapter")(ids).logits
    torch.testing.assert_close(wrapped, expected, atol=1e-4, rtol=1e-4)


def test_moe_expert_adapters_merge(tmp_path, tokenizer):
    base = random_model_dir(tmp_path / "base", tokenizer, use_moe=True)
    peft_model = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "gate_proj", "down_proj"])
    merge_adapter_dir(base, tmp_path / "adapter", tmp_path / "merged")
    assert_equal_in_float64(tmp_path / "merged", peft_model, random_ids(2, 16))


def test_bad_adapters_fail_naming_the_key(tmp_path, tokenizer):
    base = random_model_dir(tmp_path / "base", tokenizer)
    make_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())

    def attempt(tensors=weights, **config_changes):
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        save_file(tensors, bad / "adapter_model.safetensors")
        (bad / "adapter_config.json").write_text(json.dumps({**config, **config_changes}))
        merge_adapter_dir(base, bad, tmp_path / "never")

    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(
        UserError,
        match=r"key 'base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight' "
        r"targets module 'model.layers.7.self_attn.q_proj'",
    ):
        attempt({k.replace("layers.0.", "layers.7."): v for k, v in weights.items()})
    with pytest.raises(
        UserError,
        match=r"'model.layers.0.self_attn.q_proj' lora_A \(8, 32\) and lora_B \(64, 8\) "
        r"do not make a delta of the base weight's shape \(64, 64\)",
    ):
        attempt({**weights, a_key: torch.zeros(8, 32)})
    with pytest.raises(UserError, match="lora_B.weight' is missing"):
        attempt({k: v for k, v in weights.items() if "layers.0.self_attn.q_proj.lora_B" not in k})
    with pytest.raises(UserError, match="adapts the embedding/output head"):
        attempt({**weights, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)})
    with pytest.raises(UserError, match="field 'use_dora' is set; merging DoRA is not supported"):
        attempt(use_dora=True)
    with pytest.raises(UserError, match="field 'r' must be a positive number"):
        attempt(r=0)
    with pytest.raises(UserError, match="adapter_config.json is missing"):
        merge_adapter_dir(base, tmp_path / "base", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_an_adapter_directory_loads_as_its_merged_base(tmp_path, tokenizer, capsys):
    """Every verb that takes a model directory takes a LoRA adapter directory: the base it names, with the
    adapter merged in memory (PEFT's logits), the tokenizer and sampling defaults of the base."""
    from minimind.cli import main
    from minimind.infer.engine import Engine
    from minimind.infer.options import generation_defaults
    from minimind.modeldir import load_model_dir
    from minimind.serve.webchat import find_models

    base = random_model_dir(tmp_path / "base", tokenizer)
    peft_model = make_adapter(base, tmp_path / "adapter", target_modules=ALL_LINEAR)
    ids = random_ids(2, 16)
    model, adapter_tokenizer = load_model_dir(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-5)
    assert adapter_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert generation_defaults(tmp_path / "adapter") == generation_defaults(base) != {}
    merge_adapter_dir(base, tmp_path / "adapter", tmp_path / "merged")
    prompt = "the quick brown fox"
    greedy = [Engine.from_pretrained(d).generate(prompt, max_new_tokens=6, temperature=0.0)
              for d in (tmp_path / "adapter", tmp_path / "merged")]
    assert greedy[0] == greedy[1]
    assert main(["generate", "--model", str(tmp_path / "adapter"), "--prompt", prompt, "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    assert greedy[0] in capsys.readouterr().out
    assert find_models(tmp_path) == [tmp_path / "adapter", tmp_path / "base", tmp_path / "merged"]

    # an adapter of an adapter merges both; two naming each other are refused, not recursed into
    import shutil

    config_file = tmp_path / "adapter" / "adapter_config.json"
    shutil.copytree(tmp_path / "adapter", tmp_path / "second")
    second = tmp_path / "second" / "adapter_config.json"
    second.write_text(json.dumps({**json.loads(second.read_text()), "base_model_name_or_path": "../adapter"}))
    with torch.no_grad():
        twice = load_model_dir(tmp_path / "second")[0](ids).logits
        assert (twice - model(ids).logits).abs().max() > 1e-3  # the adapter's delta, added a second time
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "../second"}))
    with pytest.raises(UserError, match="adapters name each other as their base model"):
        load_model_dir(tmp_path / "adapter")
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": "org/x"}))
    with pytest.raises(UserError, match="an adapter of base model 'org/x', which is not a local model directory; "
                                        "merge it with `minimind convert BASE --merge-lora"):
        load_model_dir(tmp_path / "adapter")

"""The minimind-3 family (QK-norm, MoE without shared experts) against transformers' Qwen3 and Qwen3-MoE."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import SAMPLE_TEXT
from dist_helpers import losses, max_loss_gap, run_ok
from safetensors.torch import save_file
from test_causal_blocks import assert_training_step_equal
from test_documents import packed_and_masked
from test_engine import hf_greedy, prompts_of
from test_lora import randomize_adapters
from test_model import randomize
from test_model_dir import FRESH_INTERPRETER
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from minimind.cli import main
from minimind.errors import UserError
from minimind.eval.ppl import evaluate_ppl
from minimind.infer import Engine
from minimind.infer.quantize import Int8Linear
from minimind.info import count_parameters
from minimind.kernels import causal_blocks, use_training_kernels
from minimind.kernels.causal_blocks import MIN_LENGTH
from minimind.lora import apply_lora, load_peft_adapter, merge_lora, save_peft_adapter
from minimind.model import MiniMindConfig, MiniMindForCausalLM
from minimind.modeldir import load_config, load_model, save_model_dir

# Small shapes on the presets' settings; head_dim 24 with 4 heads is not dim / n_heads, as Qwen3 allows.
SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, hidden_dim=96, vocab_size=512,
             max_seq_len=512)
PRESETS3 = ["minimind3", "minimind3-moe"]


def tiny3(preset: str = "minimind3", seed: int = 0, **overrides) -> MiniMindForCausalLM:
    """A randomized tiny model of a minimind-3 preset, in eval mode."""
    model = MiniMindForCausalLM(MiniMindConfig.from_preset(preset, **{**SMALL, **overrides})).eval()
    randomize(model, seed)
    return model


def qwen3_config(config: MiniMindConfig) -> dict:
    """The Qwen3 / Qwen3-MoE config fields of the same model."""
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len, tie_word_embeddings=True, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if config.use_moe:
        fields.update(num_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                      moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=config.aux_loss_alpha)
    return fields


def qwen3_twin(model: MiniMindForCausalLM, tmp_path) -> torch.nn.Module:
    """transformers' own Qwen3 (or Qwen3-MoE) loaded from a checkpoint of our state dict under our names.

    Written to disk and read by `from_pretrained`, so transformers' per-expert → fused-expert mapping for
    Qwen3-MoE checkpoints applies: the names are checked against the format released Qwen3 models use."""
    config = model.config
    cls, config_cls = (Qwen3MoeForCausalLM, Qwen3MoeConfig) if config.use_moe else (Qwen3ForCausalLM, Qwen3Config)
    config_cls(**qwen3_config(config)).save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    twin, info = cls.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return twin.eval()


def test_presets_have_the_exact_parameter_counts():
    for name, exact, active in (("minimind3", 63_912_192, 63_912_192), ("minimind3-moe", 198_416_640, 63_936_768)):
        config = MiniMindConfig.from_preset(name)
        with torch.device("meta"):
            built = sum(p.numel() for p in MiniMindForCausalLM(config).parameters())
        assert built == count_parameters(config).total == exact, name
        assert count_parameters(config).active == active, name


@pytest.mark.parametrize("preset", PRESETS3)
def test_logits_equal_transformers_qwen3(preset, tmp_path):
    model = tiny3(preset)
    twin = qwen3_twin(model, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, twin(ids).logits
    assert ours.abs().max() > 1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_info_cli_prints_the_presets_counts(capsys):
    for name, total in (("minimind3", "63,912,192"), ("minimind3-moe", "198,416,640")):
        assert main(["info", "--preset", name]) == 0
        out = capsys.readouterr().out
        assert f"model {name}" in out and total in out and "head_dim=96" in out and "qk_norm" in out


def test_old_configs_keep_their_shape_and_top1_routing(tmp_path):
    """config.json files written before these fields existed: head size dim/n_heads, no QK-norm, and a top-1
    router that keeps scaling the expert by its probability; minimind-3 models renormalise it to 1."""
    old = {"model_type": "minimind", "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 512,
           "use_moe": True, "n_routed_experts": 4, "num_experts_per_tok": 1, "n_shared_experts": 1,
           "norm_topk_prob": True}
    (tmp_path / "config.json").write_text(json.dumps(old))
    config = load_config(tmp_path)
    assert (config.head_dim, config.qk_norm, config.norm_top1_prob, config.moe_intermediate_size) == (
        16, False, False, config.hidden_dim)
    x = torch.randn(1, 9, 64)
    old_gate = MiniMindForCausalLM(config).model.layers[0].mlp.gate
    new_gate = tiny3("minimind3-moe", dim=64).model.layers[0].mlp.gate
    with torch.no_grad():
        new_gate.weight.copy_(old_gate.weight)
        old_ids, old_weights, _ = old_gate(x)
        new_ids, new_weights, _ = new_gate(x)
    probabilities = (x.reshape(-1, 64) @ old_gate.weight.T).softmax(-1)
    assert torch.equal(old_ids, new_ids)
    torch.testing.assert_close(old_weights, probabilities.gather(1, old_ids))  # as MiniMind2 routers were trained
    assert bool((old_weights < 1).all()) and torch.equal(new_weights, torch.ones_like(new_weights))
    assert "head_dim" not in config.to_dict()  # written as before: the head size follows from dim / n_heads
    assert tiny3().config.to_dict()["head_dim"] == 24  # a head size of its own is written


@pytest.mark.parametrize("preset", PRESETS3)
def test_kv_cache_decode_equals_full_recompute(preset):
    model = tiny3(preset)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        steps = [model(ids[:, :8], past_key_values=cache, use_cache=True).logits]
        for t in range(8, 20):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", PRESETS3)
def test_engine_greedy_equals_hf_generate(tokenizer, preset):
    model = tiny3(preset)
    engine = Engine(model, tokenizer)
    prompt = prompts_of((7,))[0]
    assert engine.completions([prompt], max_new_tokens=10, ignore_eos=True)[0].token_ids == hf_greedy(model, prompt, 10)


def test_lora_merges_and_peft_loads_the_adapter_on_a_qk_norm_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny3()
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert len(wrapped) == 2 * 7 and not any("norm" in name for name in wrapped)  # QK-norm weights stay frozen
    randomize_adapters(model)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = model.eval()(ids).logits
    save_peft_adapter(model, tmp_path, "some/base", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                     "up_proj", "down_proj"])
    with torch.no_grad():
        assert (adapted - tiny3()(ids).logits).abs().max() > 1e-2
        torch.testing.assert_close(peft.PeftModel.from_pretrained(tiny3(), str(tmp_path))(ids).logits, adapted,
                                   rtol=0, atol=5e-5)
        torch.testing.assert_close(load_peft_adapter(tiny3(), tmp_path)(ids).logits, adapted, rtol=0, atol=5e-5)
        torch.testing.assert_close(merge_lora(model)(ids).logits, adapted, rtol=0, atol=5e-5)


@pytest.fixture(scope="module")
def trained3(tokenizer) -> MiniMindForCausalLM:
    """A tiny minimind3-moe fitted briefly on the sample text, so its predictions are far from uniform."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig.from_preset("minimind3-moe", **SMALL)).train()
    rows = [torch.tensor(tokenizer.encode(t, add_special_tokens=False))[None] for t in SAMPLE_TEXT]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(80):
        model(input_ids=rows[step % len(rows)], labels=rows[step % len(rows)], use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.slow
def test_int8_perplexity_within_two_percent(trained3, tokenizer):
    fp32, int8 = Engine(trained3, tokenizer), Engine(trained3, tokenizer, quantize="int8")
    attention = int8.model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, Int8Linear) and isinstance(int8.model.lm_head, Int8Linear)
    assert attention.q_norm.weight.dtype == torch.float32  # the norms and the router stay in float
    texts = [f"{t} #{i}" for i, t in enumerate(SAMPLE_TEXT * 3)]
    base = evaluate_ppl(fp32.model, tokenizer, texts)["ppl"]
    assert base < 50  # trained: far below the vocabulary size of 512
    assert abs(evaluate_ppl(int8.model, tokenizer, texts)["ppl"] - base) / base < 0.02


@pytest.mark.slow
def test_compiled_decode_equals_eager_engine(tokenizer):
    prompt = prompts_of((6,))[0]
    eager = Engine(tiny3(), tokenizer).completions([prompt], max_new_tokens=10, ignore_eos=True)[0].token_ids
    compiled = Engine(tiny3(), tokenizer, compile=True)
    assert compiled.warm_up() > 0
    assert compiled.completions([prompt], max_new_tokens=10, ignore_eos=True)[0].token_ids == eager


def test_training_through_causal_blocks_matches_qwen3(monkeypatch, tmp_path):
    """A CPU fp32 training forward at a length the causal blocks serve: loss and every gradient as Qwen3's."""
    calls = []
    real = causal_blocks._CausalBlocks.apply
    monkeypatch.setattr(causal_blocks._CausalBlocks, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    model = tiny3().train()
    use_training_kernels(model, torch.device("cpu"))  # what the trainer selects for a CPU run
    # From 3: HF gives the pad token's (id 0) embedding row no gradient (padding_idx), we do.
    ids = torch.randint(3, 512, (2, MIN_LENGTH + 17), generator=torch.Generator().manual_seed(5))
    assert_training_step_equal(model, qwen3_twin(model, tmp_path).train(), ids)
    assert len(calls) == model.config.n_layers


@pytest.mark.parametrize("preset", PRESETS3)
def test_packed_documents_equal_the_masked_path(preset):
    """Packed SFT rows (per-document attention on CPU) give the loss and gradients of the block-diagonal mask."""
    doc_ids = torch.tensor([[0] * 40 + [1] * 25 + [2] * 10 + [-1] * 5])
    tokens = torch.randint(3, 512, doc_ids.shape, generator=torch.Generator().manual_seed(6))
    results = packed_and_masked(lambda: tiny3(preset), tokens, doc_ids)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-4)
    for name, grad in results[1][1].items():
        # At top-1 the renormalised weight is p/p = 1: the router's LM-loss gradient is rounding noise (~1e-7).
        scale = max(grad.abs().max().item(), 1.0)
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_saved_directory_loads_as_remote_code_in_a_fresh_interpreter(tokenizer, tmp_path):
    model = tiny3("minimind3-moe")
    save_model_dir(model, tokenizer, tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["qk_norm"] is True and saved["head_dim"] == 24 and saved["n_shared_experts"] == 0
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(load_model(tmp_path / "model")(ids).logits, want, rtol=0, atol=0)
        remote = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), trust_remote_code=True).eval()
        torch.testing.assert_close(remote(ids).logits, want, rtol=0, atol=1e-6)
    copy = tmp_path / "copied"
    shutil.copytree(tmp_path / "model", copy)
    result = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER, str(copy)], capture_output=True, text=True,
                            cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def pretrain3(corpus, tokenizer_dir, out, *extra: str) -> list[str]:
    """`minimind pretrain` of a tiny minimind3-moe (the preset with its shape shrunk), 6 steps on CPU."""
    shape = [f"{k}={v}" for k, v in dict(SMALL, vocab_size=512, dropout=0).items() if k not in ("vocab_size",)]
    sets = [arg for pair in shape for arg in ("--set", pair)]
    return ["pretrain", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--preset", "minimind3-moe", *sets, "--max-seq-len", "32", "--max-steps", "6", "--warmup-steps", "1",
            "--device", "cpu", "--dtype", "fp32", "--log-every", "1", *extra]


@pytest.mark.slow
def test_fsdp_on_two_ranks_trains_like_one_process(tmp_path, corpus_file, tokenizer_dir):
    reference, sharded = tmp_path / "one", tmp_path / "fsdp"
    run_ok(0, pretrain3(corpus_file, tokenizer_dir, reference, "--batch-size", "4"))
    run_ok(2, pretrain3(corpus_file, tokenizer_dir, sharded, "--strategy", "fsdp", "--batch-size", "2"))
    assert max_loss_gap(reference, sharded) < 1e-5
    assert losses(sharded)[-1][1] < losses(sharded)[0][1]
    model = load_model(sharded)
    assert model.config.qk_norm and model.config.norm_top1_prob and not model.config.n_shared_experts


@pytest.mark.parametrize("field, value, message", [
    ("head_dim", 0, "'head_dim' must be a positive integer"), ("head_dim", "96", "'head_dim' must be a positive"),
    ("head_dim", 25, "'head_dim' \\(25; dim/n_heads unless given\\) must be even"),
    ("qk_norm", "yes", "'qk_norm' must be true or false"), ("norm_top1_prob", 1, "'norm_top1_prob' must be true"),
    ("moe_intermediate_size", -5, "'moe_intermediate_size' must be a positive integer"),
])
def test_bad_new_fields_are_one_sentence_naming_the_file(tmp_path, field, value, message):
    config = MiniMindConfig.from_preset("minimind3-moe", **SMALL).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(UserError, match=f"config.json: config field {message}"):
        load_config(tmp_path)

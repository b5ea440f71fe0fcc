"""int8 inference: its quality cost (perplexity, greedy agreement) on a trained tiny model, and its plumbing."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_model

from minimind.cli import main
from minimind.errors import UserError
from minimind.eval.ppl import evaluate_ppl
from minimind.infer import Engine
from minimind.infer.quantize import Int8Linear, quantize_int8


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny model fitted for a few seconds on the sample text, so its predictions are far from uniform."""
    model = tiny_model(dim=128, n_layers=2, n_heads=4, n_kv_heads=2).train()
    ids = [torch.tensor(tokenizer.encode(t, add_special_tokens=False)) for t in SAMPLE_TEXT]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(150):
        row = ids[step % len(ids)][None]
        loss = model(input_ids=row, labels=row, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_int8_linear_is_close_to_float():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=False)
    x = torch.randn(5, 7, 64)
    quantized = Int8Linear(linear)
    exact = linear(x)
    assert quantized(x).shape == exact.shape and quantized.weight_bytes() == 64 * 96
    assert ((quantized(x) - exact).norm() / exact.norm()) < 0.03


def test_int8_perplexity_within_two_percent_and_greedy_mostly_agrees(trained, tokenizer):
    fp32, int8 = Engine(trained, tokenizer), Engine(trained, tokenizer, quantize="int8")
    texts = [f"{t} #{i}" for i, t in enumerate(SAMPLE_TEXT * 3)]
    base = evaluate_ppl(fp32.model, tokenizer, texts)["ppl"]
    quant = evaluate_ppl(int8.model, tokenizer, texts)["ppl"]
    assert base < 50  # trained: far below the vocabulary size of 512
    assert abs(quant - base) / base < 0.02
    prompts = ["MiniMind is", "北京是", "The capital of", "def add("]
    want = [c.token_ids for c in fp32.completions(prompts, max_new_tokens=16, ignore_eos=True)]
    got = [c.token_ids for c in int8.completions(prompts, max_new_tokens=16, ignore_eos=True)]
    agree = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    assert agree >= 0.8 * 16 * len(prompts)


@pytest.mark.slow
def test_int8_linear_under_compile_is_weight_only():
    """Compiled, the int8 weights multiply float activations: exactly x @ (q * scale).T."""
    torch.manual_seed(0)
    quantized = Int8Linear(torch.nn.Linear(32, 48, bias=False))
    dequantized = quantized.qweight.float() * quantized.scales[:, None]
    compiled = torch.compile(quantized, dynamic=False)
    for rows in (1, 12):  # the row-dot form (decoding) and the matmul form
        x = torch.randn(rows, 32)
        torch.testing.assert_close(compiled(x), x @ dequantized.T, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_int8_engine_follows_the_float_model(trained, tokenizer):
    prompts = ["MiniMind is", "北京是"]
    want = [Engine(trained, tokenizer).completions([p], max_new_tokens=12, ignore_eos=True)[0].token_ids
            for p in prompts]
    engine = Engine(trained, tokenizer, quantize="int8", compile=True)
    got = [engine.completions([p], max_new_tokens=12, ignore_eos=True)[0].token_ids for p in prompts]
    assert sum(a == b for w, g in zip(want, got) for a, b in zip(w, g)) >= 0.8 * 24


def test_quantize_leaves_the_callers_model_alone_and_converts_projections(tokenizer):
    model = tiny_model()
    engine = Engine(model, tokenizer, quantize="int8")
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, Int8Linear)
    layer = engine.model.model.layers[0]
    assert isinstance(engine.model.lm_head, Int8Linear) and isinstance(layer.mlp.down_proj, Int8Linear)
    assert isinstance(engine.model.model.embed_tokens, torch.nn.Embedding)  # lookups stay in float
    assert engine.quantize == "int8"


def test_quantize_keeps_the_moe_router_in_float():
    model = quantize_int8(tiny_model(use_moe=True))
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp.gate.weight, torch.nn.Parameter) and isinstance(mlp.experts[0].up_proj, Int8Linear)


def test_bad_quantize_value_is_a_user_error(tokenizer):
    with pytest.raises(UserError, match="int4"):
        Engine(tiny_model(), tokenizer, quantize="int4")


def test_generate_cli_with_quantize(model_dir, capsys, cli_engines):
    code = main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "4",
                 "--temperature", "0", "--quantize", "int8", "--device", "cpu"])
    assert code == 0
    (engine,) = cli_engines
    assert engine.quantize == "int8" and isinstance(engine.model.lm_head, Int8Linear)
    int8 = Engine.from_pretrained(model_dir, quantize="int8")
    assert capsys.readouterr().out == int8.generate("hello", max_new_tokens=4, temperature=0.0) + "\n"

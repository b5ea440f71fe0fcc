"""int8 and int4 inference: their quality cost (perplexity, greedy agreement) on a trained tiny model, and plumbing."""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE_TEXT, tiny_model

from minimind.cli import main
from minimind.errors import UserError
from minimind.eval.ppl import evaluate_ppl
from minimind.infer import Engine
from minimind.infer.quantize import Int4Linear, Int8Linear, quantize_int8, quantize_model, quantize_q4_0


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
    # Teacher-forced: the int8 model's likeliest token at every position of the float model's greedy text. Run
    # freely, one flipped near-tie changes every later token (this trained model has one at the second token
    # after "MiniMind is": 0.056 nats between its two likeliest tokens in float32).
    agree = 0
    for prompt, tokens in zip(prompts, want):
        with torch.no_grad():
            logits = int8.model(input_ids=torch.tensor([fp32.encode(prompt) + tokens])).logits[0]
        agree += (logits[-len(tokens) - 1 : -1].argmax(-1) == torch.tensor(tokens)).sum().item()
    assert agree >= 0.9 * 16 * len(prompts)
    got = int8.completions(prompts, max_new_tokens=16, ignore_eos=True)  # freely: the first tokens agree
    assert [c.token_ids[0] for c in got] == [w[0] for w in want]


@pytest.mark.slow
def test_int8_linear_under_compile():
    """Compiled, one row runs what eager runs (the VNNI kernel where the CPU has it and torch runs one thread,
    else the float row-dot); more rows multiply float activations by the int8 weights: exactly x @ (q * scale).T."""
    torch.manual_seed(0)
    quantized = Int8Linear(torch.nn.Linear(32, 48, bias=False))
    dequantized = quantized.int8_weight().float() * quantized.scales[:, None]
    compiled = torch.compile(quantized, dynamic=False, fullgraph=True)  # a graph break would split the decode step
    one = torch.randn(1, 32)
    want = quantized(one) if quantized.vnni else one @ dequantized.T
    torch.testing.assert_close(compiled(one), want, rtol=1e-5, atol=1e-5)
    x = torch.randn(12, 32)
    torch.testing.assert_close(compiled(x), x @ dequantized.T, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_int8_engine_follows_the_eager_one(trained, tokenizer):
    prompts = ["MiniMind is", "北京是"]
    eager = Engine(trained, tokenizer, quantize="int8")
    want = [eager.completions([p], max_new_tokens=12, ignore_eos=True)[0].token_ids for p in prompts]
    engine = Engine(trained, tokenizer, quantize="int8", compile=True)
    got = [engine.completions([p], max_new_tokens=12, ignore_eos=True)[0].token_ids for p in prompts]
    assert sum(a == b for w, g in zip(want, got) for a, b in zip(w, g)) >= 0.9 * 24


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
    with pytest.raises(UserError, match="'int2'; expected one of int8, int4"):
        Engine(tiny_model(), tokenizer, quantize="int2")


@pytest.mark.parametrize(("mode", "layer"), [("int8", Int8Linear), ("int4", Int4Linear)])
def test_generate_cli_with_quantize(model_dir, capsys, cli_engines, mode, layer):
    code = main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "4",
                 "--temperature", "0", "--quantize", mode, "--device", "cpu"])
    assert code == 0
    (engine,) = cli_engines
    assert engine.quantize == mode and isinstance(engine.model.lm_head, layer)
    quantized = Engine.from_pretrained(model_dir, quantize=mode)
    assert capsys.readouterr().out == quantized.generate("hello", max_new_tokens=4, temperature=0.0) + "\n"


def test_int4_linear_is_the_dequantized_weight_matmul():
    """q4_0 codes and scales, read back exactly; the kernel multiplies bf16 inputs by them (bf16 output)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=False)
    quantized = Int4Linear(linear)
    codes, scales = quantize_q4_0(linear.weight.detach())
    assert codes.shape == (96, 64) and scales.shape == (96, 2) and int(codes.max()) <= 15
    expected_weight = (codes.float() - 8) * scales.repeat_interleave(32, dim=1)
    assert torch.equal(quantized.dequantized(), expected_weight)
    # rounded to the nearest step d, except at +8 d, which clamps to 7 d (q4_0's codes run from -8 to 7)
    step = scales.repeat_interleave(32, dim=1).abs()
    error = (expected_weight - linear.weight.detach()).abs() / step
    assert error.max() <= 1.05 and error.mean() < 0.3
    x = torch.randn(5, 7, 64)
    got = quantized(x)
    exact = x.to(torch.bfloat16).float() @ expected_weight.T
    assert got.shape == (5, 7, 96) and got.dtype == torch.float32 and quantized.weight_bytes() == 64 * 96 // 2
    torch.testing.assert_close(got, exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())
    assert ((got - linear(x)).norm() / linear(x).norm()) < 0.15  # 4-bit weights: ~7% here


def test_int4_codes_follow_llama_cpp_q4_0(tmp_path):
    """Our codes are gguf's q4_0 codes wherever the scale's bf16 rounding does not move a value across a step."""
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(1)
    weight = torch.randn(32, 128)
    codes, scales = quantize_q4_0(weight)
    theirs = gguf.quants.dequantize(gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q4_0),
                                    gguf.GGMLQuantizationType.Q4_0)
    ours = (codes.float() - 8) * scales.repeat_interleave(32, dim=1)
    assert (torch.from_numpy(theirs) - ours).abs().le(1e-2 * weight.abs().max()).float().mean() > 0.97


def test_int4_perplexity_within_five_percent_and_generates(trained, tokenizer):
    fp32, int4 = Engine(trained, tokenizer), Engine(trained, tokenizer, quantize="int4")
    assert isinstance(int4.model.lm_head, Int4Linear) and int4.quantize == "int4"
    assert isinstance(int4.model.model.layers[1].self_attn.k_proj, Int4Linear)
    texts = [f"{t} #{i}" for i, t in enumerate(SAMPLE_TEXT * 3)]
    base = evaluate_ppl(fp32.model, tokenizer, texts)["ppl"]
    quant = evaluate_ppl(int4.model, tokenizer, texts)["ppl"]
    assert base < 50 and abs(quant - base) / base < 0.05
    prompts = ["MiniMind is", "北京是", "The capital of", "def add("]
    want = [c.token_ids for c in fp32.completions(prompts, max_new_tokens=16, ignore_eos=True)]
    got = [c.token_ids for c in int4.completions(prompts, max_new_tokens=16, ignore_eos=True)]
    assert all(len(g) == 16 for g in got)
    assert sum(a == b for w, g in zip(want, got) for a, b in zip(w, g)) >= 0.6 * 16 * len(prompts)
    # rows are independent: a prompt alone decodes as it does beside the others
    assert int4.completions(prompts[:1], max_new_tokens=16, ignore_eos=True)[0].token_ids == got[0]


def test_int4_keeps_layers_the_kernel_cannot_take_in_float(tokenizer):
    """in_features not a multiple of 32 (dim 48): those projections stay float; the others are int4."""
    model = quantize_model(tiny_model(dim=48, n_heads=4, n_kv_heads=2, hidden_dim=128), "int4")
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert type(attention.q_proj) is torch.nn.Linear and type(mlp.up_proj) is torch.nn.Linear
    assert isinstance(mlp.down_proj, Int4Linear)  # 128 inputs, 48 outputs (a multiple of 16)
    engine = Engine(tiny_model(dim=48, n_heads=4, n_kv_heads=2, hidden_dim=128), tokenizer, quantize="int4")
    assert len(engine.completions(["hello"], max_new_tokens=4, ignore_eos=True)[0].token_ids) == 4
    with pytest.raises(ValueError, match="in_features % 32"):
        Int4Linear(torch.nn.Linear(48, 64, bias=False))


def test_int4_keeps_the_moe_router_in_float():
    mlp = quantize_model(tiny_model(use_moe=True), "int4").model.layers[0].mlp
    assert isinstance(mlp.gate.weight, torch.nn.Parameter) and isinstance(mlp.experts[0].up_proj, Int4Linear)


@pytest.mark.slow
def test_compiled_int4_engine_follows_the_eager_one(trained, tokenizer):
    prompts = ["MiniMind is", "北京是"]
    eager = Engine(trained, tokenizer, quantize="int4")
    want = [eager.completions([p], max_new_tokens=12, ignore_eos=True)[0].token_ids for p in prompts]
    engine = Engine(trained, tokenizer, quantize="int4", compile=True)
    got = [engine.completions([p], max_new_tokens=12, ignore_eos=True)[0].token_ids for p in prompts]
    assert sum(a == b for w, g in zip(want, got) for a, b in zip(w, g)) >= 0.9 * 24


"""The fast paths compute what the plain ones do: fused RoPE, CPU weight layout, the decode head, compiled decode."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from test_engine import hf_greedy, prompts_of, random_model
from test_model import llama_twin, randomize
from torch._inductor.utils import run_and_get_code

from minimind.errors import UserError
from minimind.infer import Engine
from minimind.infer.cache import SlotKVCache
from minimind.infer.layout import OutputHead, gemv_layout
from minimind.model.layers import rotate_qk, signed_sin
from minimind.modeldir import load_model


def test_rotate_qk_is_the_textbook_rotate_half_rope():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    angles = torch.randn(2, 1, 5, 4)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()

    def textbook(x):  # HF Llama: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
        return x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin

    q_rot, k_rot = rotate_qk(q, k, cos, signed_sin(sin))
    torch.testing.assert_close(q_rot, textbook(q), rtol=0, atol=1e-6)
    torch.testing.assert_close(k_rot, textbook(k), rtol=0, atol=1e-6)


def test_one_query_attention_is_sdpa_over_the_cached_columns(tokenizer):
    """The written-out attention of compiled decode steps: SDPA's result with GQA and a column mask."""
    from minimind.kernels.attention import inline_one_query_attention, one_query, one_query_matmul_attention
    from minimind.model.layers import Attention, sdpa_attention

    attention = tiny_model().model.layers[0].self_attn
    assert isinstance(attention, Attention) and attention.n_rep > 1
    torch.manual_seed(0)
    b, s, d = 2, 11, attention.head_dim
    q = torch.randn(b, attention.n_heads, 1, d)
    k, v = torch.randn(b, attention.n_kv_heads, s, d), torch.randn(b, attention.n_kv_heads, s, d)
    mask = torch.arange(s) <= torch.tensor([4, 9])[:, None, None, None]  # (B, 1, 1, S): rows at 4 and 9
    want = sdpa_attention(attention, q, k, v, mask, 0.0)
    torch.testing.assert_close(one_query(attention, q, k, v, mask), want, rtol=1e-5, atol=1e-6)
    # The compiled step hands over the whole cache; columns past the mask's width are never read.
    k_cache, v_cache = (torch.cat((t, torch.full_like(t, float("nan"))), dim=2) for t in (k, v))
    torch.testing.assert_close(one_query(attention, q, k_cache, v_cache, mask), want, rtol=1e-5, atol=1e-6)
    # Eager bf16 decoding on CPU: the same attention as two matmuls, with and without a mask.
    q16, k16, v16 = (t.bfloat16() for t in (q, k, v))
    for m in (mask, None):
        got = one_query_matmul_attention(attention, q16, k16, v16, m, 0.0)
        assert got.dtype == torch.bfloat16
        want16 = sdpa_attention(attention, q16.float(), k16.float(), v16.float(), m, 0.0)
        torch.testing.assert_close(got.float(), want16, rtol=0.02, atol=0.02)
    # Outside a compiled step the inline implementation is SDPA's.
    torch.testing.assert_close(inline_one_query_attention(attention, q, k, v, mask, 0.0), want, rtol=0, atol=0)
    # A part of a compiled step that Dynamo runs eagerly (MoE routing, a frame past the recompile limit) still gets
    # the whole cache with a narrower mask: the columns past it are not attended.
    got = inline_one_query_attention(attention, q, k_cache, v_cache, mask, 0.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Eager float32 decoding on a CPU with the row kernels: `one_query_attention`, which an Engine installs.
    from minimind.kernels import int_gemv
    from minimind.kernels.attention import one_query_kernel_attention

    if int_gemv.available():
        engine_attention = Engine(tiny_model(), tokenizer).model.model.layers[0].self_attn.attention_function
        assert engine_attention is one_query_kernel_attention
        for m, k_in, v_in in ((mask, k_cache, v_cache), (None, k, v)):
            torch.testing.assert_close(one_query_kernel_attention(attention, q, k_in, v_in, m, 0.0),
                                       sdpa_attention(attention, q, k, v, m, 0.0), rtol=1e-5, atol=1e-6)
    prompt_q = torch.randn(b, attention.n_heads, s, d)  # several new tokens (a prompt): SDPA's causal attention
    assert torch.equal(one_query_kernel_attention(attention, prompt_q, k, v, None, 0.0),
                       sdpa_attention(attention, prompt_q, k, v, None, 0.0))


def test_gemv_layout_keeps_values_names_and_hf_equality_and_saves(tmp_path):
    model = tiny_model()
    randomize(model)
    llama = llama_twin(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 512, (2, 9))
    assert gemv_layout(model) == 2 * 7  # 7 projections per layer; the tied head/embedding is left alone
    assert model.model.layers[0].self_attn.q_proj.weight.t().is_contiguous()
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.lm_head.weight.is_contiguous()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = load_model(tmp_path)
    assert all(torch.equal(before[k], v) for k, v in reloaded.state_dict().items())


def test_output_head_follows_in_place_weight_updates():
    head = torch.nn.Linear(8, 16, bias=False)
    fast = OutputHead(head)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fast(x), head(x))
    with torch.no_grad():
        head.weight.mul_(-2.0)  # what an optimizer step does to a model an RL stage also decodes with
    torch.testing.assert_close(fast(x), head(x))


def test_engine_tracks_weight_updates_between_generations(tokenizer):
    model = random_model()
    engine = Engine(model, tokenizer)
    prompt = prompts_of((6,))[0]
    first = engine.completions([prompt], max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert first == hf_greedy(model, prompt, 6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    second = engine.completions([prompt], max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert second == hf_greedy(model, prompt, 6) and second != first


def test_compile_needs_a_minimind_model(tokenizer):
    with pytest.raises(UserError, match="needs a MiniMind model"):
        Engine(llama_twin(tiny_model()), tokenizer, compile=True)


def run_two(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Two requests of 3 and 12 new tokens: two rows decode together (compiled: the batched package where the
    engine has one, else eagerly), then the survivor alone (compiled)."""
    ids = [engine.add(p, max_new_tokens=n, ignore_eos=True) for p, n in zip(prompts, (3, 12))]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return [tokens[i] for i in ids]


@pytest.mark.slow
def test_compiled_decode_equals_eager_engine(tokenizer):
    """Compiled decode gives the eager engine's tokens, and after `warm_up` nothing compiles again, not even
    when a longer request grows the cache: the attended width and the capacity are symbolic sizes."""
    from torch._dynamo.utils import counters

    prompts = prompts_of((5, 9))
    eager, compiled = Engine(random_model(), tokenizer), Engine(random_model(), tokenizer, compile=True)
    assert compiled.warm_up() > 0 and eager.warm_up() == 0
    graphs = counters["stats"]["unique_graphs"]
    want = run_two(eager, prompts)
    assert run_two(compiled, prompts) == want
    assert want[1] == hf_greedy(random_model(), prompts[1], 12)
    capacity = compiled.cache.capacity
    n = 4 * capacity
    long = compiled.completions([prompts[0]], max_new_tokens=n, ignore_eos=True)[0].token_ids
    assert compiled.cache.capacity > capacity and len(long) == n
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation
    assert long == eager.completions([prompts[0]], max_new_tokens=n, ignore_eos=True)[0].token_ids


def test_packed_linears_compute_what_linear_does_and_stay_plain_linears(tmp_path):
    from minimind.infer.layout import PackedLinear, pack_linears

    model = tiny_model()
    randomize(model)
    llama = llama_twin(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert pack_linears(model) == n_linear  # every projection and the head
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer) is PackedLinear and isinstance(layer, torch.nn.Linear)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
        x = torch.randn(3, 5, layer.in_features).transpose(0, 1)  # any shape and strides
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        assert layer._packed is not None and layer._packed.is_mkldnn  # the oneDNN path ran, not the fallback
        layer.weight.mul_(-2.0)  # an optimizer step in place: the packed copy is rebuilt
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        layer.weight.div_(-2.0)
    # with grad the plain path runs: training a packed model gives HF's gradients
    model(ids, labels=ids).loss.backward()
    llama(ids, labels=ids).loss.backward()
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight.grad,
                               llama.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-4, atol=1e-6)
    copied = copy.deepcopy(model)  # the oneDNN copy has no storage: copies leave it behind and rebuild it
    with torch.no_grad():
        torch.testing.assert_close(copied(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = load_model(tmp_path)
    assert all(torch.equal(before[k], v) for k, v in reloaded.state_dict().items())


def test_a_few_float_rows_go_through_the_row_kernel_on_the_weight_itself():
    """Decoding up to FLOAT_ROWS sequences: PackedLinear and OutputHead multiply by the weight itself through
    f32_gemv (no oneDNN copy is made), equal to F.linear, and an in-place weight change is seen at once."""
    from minimind.infer.layout import PackedLinear, few_rows_kernel, pack_linears
    from minimind.kernels import int_gemv

    model = tiny_model()
    randomize(model)
    head = OutputHead(model.lm_head)  # on the plain head (an engine's prepacked head is a PackedLinear)
    pack_linears(model)
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer) is PackedLinear
    kernels = int_gemv.available()
    assert layer.use_f32_gemv == head.kernel == kernels == few_rows_kernel(layer.weight)
    with torch.no_grad():
        for rows in (1, 3, int_gemv.FLOAT_ROWS):
            x = torch.randn(rows, 1, layer.in_features)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
            hidden = torch.randn(rows, head.head.in_features)
            torch.testing.assert_close(head(hidden), hidden @ head.head.weight.t(), rtol=1e-5, atol=1e-5)
        assert (layer._packed is None and head._weight_t is None) == kernels  # the kernel ran, not a copy
        layer.weight.mul_(-2.0)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
        more = torch.randn(int_gemv.FLOAT_ROWS + 1, layer.in_features)  # more rows: oneDNN on its packed copy
        torch.testing.assert_close(layer(more), torch.nn.functional.linear(more, layer.weight), rtol=1e-5, atol=1e-5)
        assert layer._packed is not None


def test_engine_without_prepack_keeps_one_copy_of_the_weights(tokenizer, model_dir, capsys, cli_engines):
    from minimind.cli import main
    from minimind.infer.layout import PackedLinear

    model = random_model()
    prompt = prompts_of((7,))[0]
    engine = Engine(model, tokenizer, prepack=False)
    assert not any(isinstance(m, PackedLinear) for m in engine.model.modules())
    up = model.model.layers[0].mlp.up_proj.weight
    assert engine.model.model.layers[0].mlp.up_proj.weight.data_ptr() == up.data_ptr()  # one copy of the weights
    got = engine.completions([prompt], max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert got == hf_greedy(random_model(), prompt, 6)
    assert any(isinstance(m, PackedLinear) for m in Engine(random_model(), tokenizer).model.modules())
    code = main(["generate", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "3",
                 "--temperature", "0", "--no-prepack", "--device", "cpu"])
    assert code == 0
    (cli_engine,) = cli_engines
    assert not any(isinstance(m, PackedLinear) for m in cli_engine.model.modules())
    unpacked = Engine.from_pretrained(model_dir, prepack=False)
    assert capsys.readouterr().out == unpacked.generate("hello", max_new_tokens=3, temperature=0.0) + "\n"


def test_bf16_linears_are_prepacked_where_onednn_has_bf16():
    """A bf16 model on CPU gets the same prepacked oneDNN matmuls (1.6-2x the float32 ones on CPUs with
    native bf16); where this CPU's oneDNN lacks bf16 nothing changes."""
    from minimind.infer.layout import PackedLinear, _onednn_linear_works, pack_linears

    reference = tiny_model()  # float32
    model = copy.deepcopy(reference).to(torch.bfloat16)
    plain = copy.deepcopy(model)
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    supported = _onednn_linear_works(torch.bfloat16)
    assert pack_linears(model) == (n_linear if supported else 0)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        exact, packed, unpacked = reference(ids).logits, model(ids).logits.float(), plain(ids).logits.float()
        if not supported:
            assert torch.equal(packed, unpacked)  # nothing changed
        # packing adds no error of its own: as close to float32 as bf16 without it is
        assert (packed - exact).abs().max() <= 2 * (unpacked - exact).abs().max()
        layer = model.model.layers[0].mlp.up_proj
        x = torch.randn(4, layer.in_features, dtype=torch.bfloat16)
        out = layer(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), x.float() @ layer.weight.float().t(), rtol=0.02, atol=0.02)
        if supported:
            assert type(layer) is PackedLinear and layer._packed is not None and layer._packed.is_mkldnn


def test_cache_stores_new_keys_in_place_at_the_bound_rows():
    """`SlotKVCache.update` writes each new token into the cache's own tensors at (absolute row, position) and
    returns views of the bound rows; under torch.compile a store made into the whole tensor stays in place
    (a store into a row slice was made on a copy of the whole cache)."""
    cache = SlotKVCache(n_layers=1, n_kv_heads=2, head_dim=4, dtype=torch.float32, device=torch.device("cpu"))
    cache.reserve(3, 6, max_rows=8, max_columns=16)
    keys, values = cache.keys[0], cache.values[0]
    cache.bind(1, 3, torch.tensor([[2], [4]]), None, 4)  # rows 1 and 2 write columns 2 and 4
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    seen_k, seen_v = cache.update(k, v, 0)
    assert cache.keys[0] is keys and cache.values[0] is values
    torch.testing.assert_close(keys[1, :, 2], k[0, :, 0], rtol=0, atol=0)
    torch.testing.assert_close(values[2, :, 4], v[1, :, 0], rtol=0, atol=0)
    assert keys[0].abs().sum() == 0 and keys[1, :, 4].abs().sum() == 0  # nothing else written
    assert seen_k.shape == (2, 2, 7, 4) and seen_k.data_ptr() == keys[1].data_ptr()
    assert seen_v.data_ptr() == values[1].data_ptr()

    def store(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        seen_k, seen_v = cache.update(k, v, 0)
        return seen_k.sum() + seen_v.sum()

    k = torch.randn(2, 2, 1, 4)
    _, code = run_and_get_code(torch.compile(store, fullgraph=True), k, v)
    torch.testing.assert_close(keys[1, :, 2], k[0, :, 0], rtol=0, atol=0)
    # no buffer the size of the bound rows' cache (2, 2, 7, 4): nothing is copied out and back in
    assert "empty_strided_cpu((2, 2, 7, 4)" not in "\n".join(code)

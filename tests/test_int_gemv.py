"""The VNNI int8 / q4_0 decode kernels (minimind/kernels/int_gemv.py) against integer arithmetic in torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from conftest import tiny_model

from minimind.infer.quantize import Int4Linear, Int8Linear, quantize_q4_0
from minimind.kernels import int_gemv

pytestmark = pytest.mark.skipif(int_gemv.isa() is None, reason="the CPU has neither AVX-512 VNNI nor AVX2")


def int8_reference(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows rounded to int8 with one scale each, integer dot products, then both scales."""
    amax = x.abs().amax(dim=1, keepdim=True)
    xq = torch.round(x * (127.0 / amax))
    dots = (xq.long() @ q.long().T).float()  # exact: |dot| < 2^24 here
    return dots * ((amax / 127.0) * scales)


def q4_reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows rounded to int8 per group of 32 (llama.cpp's q8_0), integer dots per group, scaled and summed."""
    groups = x.reshape(x.shape[0], -1, 32)  # (M, G, 32)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    xq = torch.round(groups * (127.0 / amax)).long()
    weights = (codes.long() - 8).reshape(codes.shape[0], -1, 32)  # (N, G, 32)
    dots = torch.einsum("mgk,ngk->mng", xq, weights).float()  # (M, N, G)
    return (dots * (scales[None] * (amax[..., 0] / 127.0)[:, None, :])).sum(-1)


@contextmanager
def threads(n: int):
    """torch's thread count set to n inside the block (int8 layers choose their kernel by it when built)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_the_kernels_are_built_and_used_here():
    assert int_gemv.available()
    assert f"minimind_int_gemv_{int_gemv.isa()}_" in str(int_gemv.library_path())  # built for this instruction set
    linear = torch.nn.Linear(64, 32, bias=False)
    assert Int4Linear(linear).vnni
    for n in (1, 2):  # the kernels split their rows across torch's threads (built with OpenMP)
        with threads(n):
            assert Int8Linear(linear).vnni


def test_the_kernels_are_built_with_openmp():
    """at::parallel_for only splits work across threads in code compiled with OpenMP: the library must call
    libgomp (built without -fopenmp, every call ran on one thread whatever torch's thread count)."""
    assert int_gemv.available()
    library = int_gemv.library_path()
    assert library is not None and b"GOMP_parallel" in library.read_bytes()


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_int8_gemv_is_the_integer_product(rows):
    torch.manual_seed(0)
    weight, x = torch.randn(80, 96), torch.randn(rows, 96)  # 5 blocks of 16 rows: a tile of 4 and one alone
    scales = weight.abs().amax(dim=1) / 127
    q = torch.round(weight / scales[:, None]).to(torch.int8)
    packed, wsum = int_gemv.pack_int8(q)
    assert torch.equal(int_gemv.unpack_int8(packed), q)
    got = int_gemv.int8_gemv(x, packed, wsum, scales)
    torch.testing.assert_close(got, int8_reference(x, q, scales), rtol=1e-5, atol=1e-5)
    exact = x @ (q.float() * scales[:, None]).T
    assert (got - exact).norm() / exact.norm() < 0.02  # the activations' int8 rounding


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_q4_gemv_is_q4_0_times_q8_0(rows):
    torch.manual_seed(1)
    weight, x = torch.randn(112, 128), torch.randn(rows, 128)  # 7 blocks of 16 rows, 4 groups of 32
    codes, scales = quantize_q4_0(weight)
    packed, blocked = int_gemv.pack_q4(codes, scales)
    got = int_gemv.q4_gemv(x, packed, blocked)
    torch.testing.assert_close(got, q4_reference(x, codes, scales), rtol=1e-4, atol=1e-4)


def test_linears_take_the_kernel_for_few_rows_and_agree_with_many():
    """Up to GEMV_ROWS rows run the kernel; a larger batch runs PyTorch's kernels; the two stay close."""
    torch.manual_seed(2)
    linear = torch.nn.Linear(128, 64, bias=False)
    x = torch.randn(8, 128)
    with threads(1):
        int8 = Int8Linear(linear)
    for layer in (int8, Int4Linear(linear)):
        batch, single = layer(x), torch.cat([layer(row[None]) for row in x])
        assert (single - batch).norm() / batch.norm() < 0.02
    torch.testing.assert_close(int8(x[:1]), int8_reference(x[:1], int8.int8_weight(), int8.scales))


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_products_of_one_input_with_several_matrices_in_one_call(rows):
    """int8_gemv_cat / q4_gemv_cat put each matrix's product side by side, the same numbers as one call each
    (matrices of 3, 5 and 1 blocks of 16 rows: tasks split across matrix ends)."""
    torch.manual_seed(3)
    x = torch.randn(rows, 128)
    weights = [torch.randn(n, 128) for n in (48, 80, 16)]
    int8 = []
    for weight in weights:
        scales = weight.abs().amax(dim=1) / 127
        int8.append((*int_gemv.pack_int8(torch.round(weight / scales[:, None]).to(torch.int8)), scales))
    apart = torch.cat([torch.ops.minimind.int8_gemv(x, *parts) for parts in int8], dim=1)
    together = torch.ops.minimind.int8_gemv_cat(x, *[list(column) for column in zip(*int8)])
    assert torch.equal(together, apart)
    q4 = [int_gemv.pack_q4(*quantize_q4_0(weight)) for weight in weights]
    apart = torch.cat([torch.ops.minimind.q4_gemv(x, *parts) for parts in q4], dim=1)
    together = torch.ops.minimind.q4_gemv_cat(x, *[list(column) for column in zip(*q4)])
    assert torch.equal(together, apart)


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_f32_gemv_is_the_float_product(rows):
    """f32_gemv multiplies rows by the model's own (out, in) float32 weights, any row count (here 100, 16 and 7:
    whole blocks of 4 rows and single ones, tasks split across matrix ends); f32_gemv_cat puts them side by side."""
    torch.manual_seed(5)
    x = torch.randn(rows, 96)
    weights = [torch.randn(n, 96) for n in (100, 16, 7)]
    for weight in weights:
        torch.testing.assert_close(torch.ops.minimind.f32_gemv(x, weight), x @ weight.T, rtol=1e-5, atol=1e-5)
    apart = torch.cat([torch.ops.minimind.f32_gemv(x, weight) for weight in weights], dim=1)
    assert torch.equal(torch.ops.minimind.f32_gemv_cat(x, weights), apart)
    assert torch.equal(torch.ops.minimind.f32_gemv(x.T.contiguous().T, weights[0]), apart[:, :100])  # any strides
    with pytest.raises(RuntimeError, match="multiple of 16"):
        torch.ops.minimind.f32_gemv(torch.randn(1, 40), torch.randn(8, 40))


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64, 128])
def test_one_query_attention_is_sdpa_over_the_attended_columns(head_dim):
    """`one_query_attention`: softmax(q k^T / sqrt(D)) v of one query per row over a strided cache view, query heads
    sharing K/V heads (GQA), a column mask (unattended columns never read, even NaN), none (every column), and
    a row that attends nothing (zeros); equal to SDPA at lengths across the 16-key blocks."""
    import torch.nn.functional as F

    assert int_gemv.available()
    torch.manual_seed(0)
    for columns in (1, 15, 16, 33, 200):
        q_and_k = torch.randn(3, 10, 1, head_dim)  # q a non-contiguous view, as after RoPE
        q = q_and_k[:, :8]
        cache_k, cache_v = torch.randn(2, 3, 2, columns + 5, head_dim).unbind(0)
        cache_k[:, :, columns:] = cache_v[:, :, columns:] = float("nan")  # past the mask's width: never read
        k, v = cache_k.transpose(0, 1).contiguous().transpose(0, 1), cache_v  # any row / head strides
        mask = torch.rand(3, 1, 1, columns) < 0.7
        mask[0, ..., 0] = True
        mask[1] = False  # a row that attends nothing
        k[2, :, :columns][:, ~mask[2, 0, 0]] = float("nan")  # an unattended column inside the width
        got = torch.ops.minimind.one_query_attention(q, k, v, mask)
        for row in (0, 2):
            want = F.scaled_dot_product_attention(q[row : row + 1], k[row : row + 1, :, :columns].nan_to_num(),
                                                  v[row : row + 1, :, :columns], attn_mask=mask[row : row + 1],
                                                  enable_gqa=True)
            torch.testing.assert_close(got[row : row + 1], want, rtol=1e-5, atol=2e-6)
        assert torch.equal(got[1], torch.zeros_like(got[1]))
        whole_k, whole_v = (t[:, :, :columns].nan_to_num() for t in (k, v))
        want = F.scaled_dot_product_attention(q, whole_k, whole_v, enable_gqa=True)
        torch.testing.assert_close(torch.ops.minimind.one_query_attention(q, whole_k, whole_v, None), want,
                                   rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("mode", ["int8", "int4", None])
def test_the_compiled_step_makes_one_call_per_shared_input(mode, tokenizer, tmp_path):
    """The compiled decode step's graph pass merges the q/k/v and gate/up products (2 calls per layer instead
    of 5, then o and down, and the head), int8, int4 and float32 (whose products `FloatGemv` turned into
    kernel calls first); the step's logits are the eager model's. The calls are counted in
    the package's list of the operators it calls outside its generated code."""
    from minimind.infer.engine import Engine

    model = tiny_model(4, dim=128)  # every projection in whole blocks of 16 rows and groups of 32 inputs
    config = model.config
    engine = Engine(model, tokenizer, quantize=mode)
    prompt = list(range(5, 17))
    eager = engine.sample_ids([prompt], max_new_tokens=4, temperature=0, ignore_eos=True)
    compiled = Engine(model, tokenizer, quantize=mode, compile=True, compile_cache=tmp_path)
    got = compiled.sample_ids([prompt], max_new_tokens=4, temperature=0, ignore_eos=True)
    assert compiled._decode_step._run is not None  # the packaged step ran
    (package,) = tmp_path.glob("decode-*.pt2")
    with zipfile.ZipFile(package) as archive:
        (listing,) = [name for name in archive.namelist() if name.endswith(".wrapper.json")]
        calls = Counter(node["node"]["target"] for node in json.loads(archive.read(listing))["nodes"])
    name = {"int8": "int8_gemv", "int4": "q4_gemv", None: "f32_gemv"}[mode]  # float32: the head joins the graph
    assert calls[f"minimind::{name}_cat"] == 2 * config.n_layers
    assert calls[f"minimind::{name}"] == 2 * config.n_layers + 1  # o, down and the head
    assert got.token_ids == eager.token_ids
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(eager.logprobs), rtol=1e-4, atol=1e-4)


def test_sample_tokens_draws_the_inverse_cdf_token_and_its_temperature_one_logprob():
    """`sample_tokens` (the Engine's unfiltered draw): the token whose cumulative softmax(l / T) passes the
    uniform, the same token `sample_rows` draws but where rounding puts the uniform at a token boundary, and the
    raw logits' log-softmax there; vocabularies across the 16- and 256-token blocks, u = 0, u near 1."""
    from minimind.infer.sampling import PARAM_COLUMNS, sample_rows

    assert int_gemv.available()
    generator = torch.Generator().manual_seed(0)
    for vocab in (5, 16, 50, 257, 6400, 6401):
        rows = 300
        logits = torch.randn(rows, vocab, generator=generator) * 3
        logits[7, vocab // 2] = 60.0  # one token holds all the mass
        temperature = torch.tensor([0.5, 1.0, 1.7])[torch.arange(rows) % 3]
        uniforms = torch.rand(rows, generator=generator)
        uniforms[:3], uniforms[3:6] = 0.0, 1 - 2**-24
        tokens, logprobs = int_gemv.sample_tokens(logits, temperature, uniforms)
        assert tokens.dtype == torch.long and tokens.shape == logprobs.shape == (rows,)
        cdf = torch.softmax(logits.double() / temperature.double()[:, None], -1).cumsum(-1)  # exact enough
        below = torch.where(tokens > 0, cdf.gather(-1, (tokens - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
        upto = cdf.gather(-1, tokens[:, None]).squeeze(-1)
        u = uniforms.double()
        lands = (below <= u + 1e-5) & (upto >= u - 1e-5)  # the token the uniform lands on
        assert (lands | ((u > 1 - 1e-6) & (tokens == logits.argmax(-1)))).all(), vocab  # or: u * total rounded up
        assert tokens[7] == vocab // 2
        params = torch.zeros(rows, len(PARAM_COLUMNS))
        params[:, 0], params[:, 2], params[:, 4] = temperature, 1.0, 1.0
        same = (sample_rows(logits, params, uniforms) == tokens).float().mean()
        assert same >= 0.98, (vocab, same)  # the rest: boundaries the two summation orders round apart
        expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs, expected, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="one float32 temperature and uniform per row"):
        torch.ops.minimind.sample_tokens(torch.randn(2, 8), torch.ones(3), torch.rand(2))


@pytest.mark.skipif(int_gemv.isa() != "avx512" or "avx2" not in int_gemv.cpu_info().flags,
                    reason="on an AVX2 machine the tests above are the AVX2 build's tests")
def test_the_avx2_build_passes_the_kernel_tests_too():
    """int_gemv.cpp holds an AVX-512 and an AVX2 section; on an AVX-512 machine the AVX2 one is built as well
    (`MINIMIND_KERNEL_ISA=avx2`, in a subprocess: one build of the library per process) and must pass the kernel
    tests above, so that neither section goes untested wherever the suite runs."""
    env = {**os.environ, "MINIMIND_KERNEL_ISA": "avx2"}
    tests = "kernels_are_built or int8_gemv_is or q4_gemv_is or f32_gemv_is or several or attention or sample_tokens"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]

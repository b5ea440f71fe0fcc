"""The compiled decode step kept on disk (infer/compile_cache.py) and the CLI's compile-by-default choice."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import tiny_config, tiny_model
from test_engine import prompts_of
from test_perf_paths import run_two

from minimind.infer import Engine
from minimind.infer.compile_cache import compile_key, default_compile_cache
from minimind.infer.options import COMPILE_ENV, add_engine_arguments, compile_by_default

CPU = torch.device("cpu")


def test_compile_key_names_a_file_per_shape_dtype_and_head():
    config = tiny_config().to_dict()
    key = compile_key(config, CPU, torch.float32, False, {"a": 1}).name
    assert key == compile_key(dict(config), CPU, torch.float32, False, {"a": 1}).name  # deterministic
    moved = {**config, "_name_or_path": "/elsewhere"}  # the same shape loaded from another directory
    assert key == compile_key(moved, CPU, torch.float32, False, {"a": 1}).name
    others = [compile_key(tiny_config(dim=32).to_dict(), CPU, torch.float32, False, {"a": 1}),
              compile_key(config, CPU, torch.bfloat16, False, {"a": 1}),
              compile_key(config, CPU, torch.float32, True, {"a": 1}),
              compile_key(config, CPU, torch.float32, False, {"a": 2}),
              compile_key(config, torch.device("meta"), torch.float32, False, {"a": 1})]
    assert len({key, *(k.name for k in others)}) == 6
    assert key.startswith("decode-") and key.endswith(".pt2")
    assert {"torch", "python", "machine", "threads", "sources"} <= set(others[0].fields)


def test_default_compile_cache_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIMIND_CACHE", str(tmp_path / "mm"))
    assert default_compile_cache() == tmp_path / "mm" / "compile"
    monkeypatch.delenv("MINIMIND_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_compile_cache() == tmp_path / "xdg" / "minimind" / "compile"


def test_the_cli_compiles_by_default_on_cpu_and_cuda_only(monkeypatch):
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert parser.parse_args([]).compile is None
    assert parser.parse_args(["--compile"]).compile is True
    assert parser.parse_args(["--no-compile"]).compile is False
    assert parser.parse_args(["--compile-cache", "d"]).compile_cache == "d"
    monkeypatch.delenv(COMPILE_ENV, raising=False)
    assert compile_by_default(None, CPU) and compile_by_default(None, torch.device("cuda"))
    assert not compile_by_default(None, torch.device("mps"))
    assert not compile_by_default(False, CPU) and compile_by_default(True, torch.device("mps"))
    for off in ("0", "off", "False"):
        monkeypatch.setenv(COMPILE_ENV, off)
        assert not compile_by_default(None, CPU) and compile_by_default(True, CPU)


@pytest.mark.slow
def test_a_saved_decode_step_is_loaded_by_the_next_engine_and_decodes_as_eager(tokenizer, tmp_path, caplog):
    """The first engine packages the step (torch.export + AOTInductor) and saves it; a second engine of the same
    shape (other weights) loads that file, traces nothing, and both give the eager engine's tokens, across cache
    growth."""
    from torch._dynamo.utils import counters

    prompts = prompts_of((5, 9))
    first = Engine(tiny_model(seed=1), tokenizer, compile=True, compile_cache=tmp_path)
    assert not first._decode_step.loaded and not list(tmp_path.iterdir())
    first.warm_up()
    saved = list(tmp_path.iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("decode-") and saved[0].stat().st_size > 0
    with caplog.at_level("WARNING"):
        assert run_two(first, prompts) == run_two(Engine(tiny_model(seed=1), tokenizer), prompts)
    # two rows at once: the batched package (float32 with the kernels) is built at its first use, saying so, and
    # saved too
    assert first._decode_step._run_rows is not None or not first._decode_step.batched
    assert ("compiling the step of 2-16 rows, once" in caplog.text) == first._decode_step.batched
    caplog.clear()
    saved = sorted(tmp_path.iterdir())
    assert len(saved) == 1 + first._decode_step.batched

    frames = counters["stats"]["calls_captured"]
    second = Engine(tiny_model(seed=2), tokenizer, compile=True, compile_cache=tmp_path)
    assert second._decode_step.loaded and (second._decode_step._run_rows is not None) == first._decode_step.batched
    second.warm_up()
    eager = Engine(tiny_model(seed=2), tokenizer)
    assert run_two(second, prompts) == run_two(eager, prompts)
    n = 4 * second.cache.capacity  # the cache grows: rows and columns are symbolic in the saved step too
    long = second.completions([prompts[0]], max_new_tokens=n, ignore_eos=True)[0].token_ids
    assert long == eager.completions([prompts[0]], max_new_tokens=n, ignore_eos=True)[0].token_ids
    assert second._decode_step._run is not None  # the package served every call: no fallback
    assert counters["stats"]["calls_captured"] == frames  # Dynamo traced nothing for the second engine
    assert sorted(tmp_path.iterdir()) == saved
    assert "compiling the step" not in caplog.text  # loaded, not compiled: nothing said


def test_an_moe_step_is_not_cached_and_decodes_as_eager(tokenizer, tmp_path, caplog):
    """MoE routing breaks the step's graph, so it cannot be exported and packaged (what the cache saves): the step
    is compiled by torch.compile, nothing is written, no failed attempt is logged, and the tokens are eager's."""
    config = dict(use_moe=True, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1)
    engine = Engine(tiny_model(seed=3, **config), tokenizer, compile=True, compile_cache=tmp_path)
    assert not engine._decode_step.cacheable and engine._decode_step.cache_path is None
    with caplog.at_level("WARNING"):
        engine.warm_up()
        prompts = prompts_of((5, 9))
        assert run_two(engine, prompts) == run_two(Engine(tiny_model(seed=3, **config), tokenizer), prompts)
    assert not engine._decode_step.packaged
    assert not list(tmp_path.iterdir()) and "packaging" not in caplog.text
    assert Engine(tiny_model(seed=3), tokenizer, compile=True, compile_cache=tmp_path)._decode_step.cacheable


@pytest.mark.slow
def test_the_packaged_step_reads_the_models_own_weights(tokenizer, tmp_path):
    """The package holds no copy of the weights: an in-place change to the model's weights changes what the loaded
    step decodes, exactly as it changes the eager engine's tokens."""
    prompts = prompts_of((5, 9))
    model = tiny_model(seed=4)
    engine = Engine(model, tokenizer, compile=True, compile_cache=tmp_path)
    engine.warm_up()
    before = run_two(engine, prompts)
    assert engine._decode_step._run is not None
    flip = tiny_model(seed=4)
    for weights in (model, flip):  # the final norm's sign flipped: other logits, other tokens
        with torch.no_grad():
            weights.model.norm.weight.neg_()
    after = run_two(engine, prompts)
    assert after != before and after == run_two(Engine(flip, tokenizer), prompts)


@pytest.mark.slow
def test_without_the_kernels_the_float_step_is_inductors_and_decodes_as_eager(tokenizer, monkeypatch):
    """Where the CPU kernels are unavailable (no AVX-512 VNNI, MINIMIND_INT_KERNELS=0), a float32 step is still
    packaged, from Inductor's own row-dot loops, with the output head outside it: the eager engine's tokens."""
    from minimind.kernels import int_gemv

    monkeypatch.setattr(int_gemv, "available", lambda: False)
    prompts = prompts_of((5, 9))
    engine = Engine(tiny_model(seed=6), tokenizer, compile=True)
    step = engine._decode_step
    assert not step.float_kernels and step.eager_head is not None
    assert run_two(engine, prompts) == run_two(Engine(tiny_model(seed=6), tokenizer), prompts)
    assert step._run is not None

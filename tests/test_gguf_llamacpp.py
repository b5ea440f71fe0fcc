"""Our GGUF export runs in llama.cpp (llama-cpp-python): same tokens, same logits, same greedy continuation.

llama-cpp-python compiles llama.cpp (about 10 minutes on 2 cores), so it is the optional `llamacpp` extra:
`make test` runs these tests when `llama_cpp` is importable and skips them, saying why, when it is not;
`make test-interop` installs the extra and sets MINIMIND_REQUIRE_INTEROP=1, under which a missing
`llama_cpp` is an error, not a skip.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from convert_helpers import random_model_dir

from minimind.convert.gguf import export_gguf
from minimind.modeldir import load_model_dir

pytestmark = pytest.mark.interop

try:
    import llama_cpp
except ImportError:
    if os.environ.get("MINIMIND_REQUIRE_INTEROP") == "1":
        raise
    pytest.skip("llama-cpp-python is not installed: `make test-interop` installs the llamacpp extra and runs "
                "these tests", allow_module_level=True)

PROMPT = "MiniMind is a small language model. 北京是中国的首都。"
NEW_TOKENS = 12


def llama_cpp_run(path, ids: list[int]) -> tuple[list[int], np.ndarray, list[int]]:
    """-> (llama.cpp's tokens for PROMPT, its logits over `ids` (T, vocab), its greedy continuation)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids) + NEW_TOKENS + 8, n_threads=2, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    new = []
    for _ in range(NEW_TOKENS):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    return tokens, logits, new


# Our dense model (llama.cpp's llama), and QK-norm ones as minimind-3 has them (qwen3, qwen3moe: routed experts
# only, top-1 renormalised), with a head size that is not dim / n_heads.
SHAPES = {"llama": {}, "qwen3": dict(qk_norm=True, head_dim=24, norm_eps=1e-6),
          "qwen3moe": dict(qk_norm=True, head_dim=24, norm_eps=1e-6, use_moe=True, n_shared_experts=0,
                           num_experts_per_tok=1)}


@pytest.mark.parametrize("architecture", list(SHAPES))
@pytest.mark.parametrize("dtype, atol", [("f32", 1e-3), ("f16", 5e-2)])
def test_llama_cpp_runs_our_gguf_like_our_model(tmp_path, tokenizer, dtype, atol, architecture):
    model_dir = random_model_dir(tmp_path / "model", tokenizer, **SHAPES[architecture])
    model, tok = load_model_dir(model_dir)
    ids = tok(PROMPT).input_ids
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    tokens, logits, new = llama_cpp_run(export_gguf(model_dir, tmp_path / f"m-{dtype}.gguf", dtype), ids)
    assert tokens == ids  # llama.cpp tokenizes with the vocabulary and merges the file carries
    np.testing.assert_allclose(logits, ours, atol=atol, rtol=0)
    if dtype == "f32":
        assert new == greedy


# YaRN as our default recipe (cos/sin x 0.1·ln(factor) + 1), with a set attention factor, and as minimind-3 has
# it (qwen3, attention factor 1.0): the prompt reaches past the original context of 8 positions.
YARN = dict(max_seq_len=64, yarn_factor=4.0, yarn_original_max_seq_len=8)


@pytest.mark.parametrize("shape", [YARN, {**YARN, "yarn_attention_factor": 0.7},
                                   {**SHAPES["qwen3"], **YARN, "yarn_attention_factor": 1.0}],
                         ids=["llama-default", "llama-factor-0.7", "qwen3-factor-1"])
def test_llama_cpp_runs_our_yarn_gguf_like_our_model(tmp_path, tokenizer, shape):
    model_dir = random_model_dir(tmp_path / "model", tokenizer, **shape)
    model, tok = load_model_dir(model_dir)
    ids = tok(PROMPT).input_ids
    assert len(ids) > YARN["yarn_original_max_seq_len"]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    _, logits, _ = llama_cpp_run(export_gguf(model_dir, tmp_path / "m.gguf", "f32"), ids)
    np.testing.assert_allclose(logits, ours, atol=1e-3, rtol=0)

"""Run our GGUF export in llama.cpp (through llama-cpp-python) and compare it with our own model.

    python bench/gguf_llamacpp.py          # a random `tiny` model with a freshly trained tokenizer
    python bench/gguf_llamacpp.py --preset minimind3-moe   # the same size with QK-norm and experts (qwen3moe)
    python bench/gguf_llamacpp.py --model runs/sft --dtypes f16 q8_0 --new-tokens 64

For each GGUF type it checks that llama.cpp tokenizes the prompt like our tokenizer, reports the largest
logit difference over the prompt, compares the greedy continuations token by token, and prints decode
speed (tokens/s) for both. Exit status 1 if the f32 file's greedy continuation differs from ours.
Quantized files (q8_0, q4_0) load without llama.cpp's repacked weight layouts unless `--repack` is given:
on this machine's CPU (AVX-512 with AMX) llama.cpp crashes with a segmentation fault in them.
llama-cpp-python is not a dependency (it compiles llama.cpp, about 10 minutes on 2 cores); without it this
prints how to install it and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

INSTALL_HINT = """llama-cpp-python is not installed, so llama.cpp cannot be run here.
Install it (builds llama.cpp from source, about 10 minutes on 2 CPU cores):
    pip install llama-cpp-python        # or: pip install -e '.[llamacpp]'
then run this script again."""
DEFAULT_PROMPT = "The built-in function len() returns the number of items in a container. For example,"


# Demo shapes: `tiny` (llama.cpp's llama architecture), and the minimind-3 presets at tiny's size, which
# export as llama.cpp's qwen3 (QK-norm) and qwen3moe (QK-norm, 4 routed experts, top-1, no shared expert).
DEMO_SHAPES = {
    "tiny": {},
    "minimind3": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=704, max_seq_len=1024),
}
DEMO_SHAPES["minimind3-moe"] = DEMO_SHAPES["minimind3"]


def demo_model_dir(out: Path, preset: str = "tiny") -> Path:
    """A random model of `preset` at tiny's size (weights scaled so greedy choices have clear margins) and a BPE
    tokenizer trained on the Python docs that ship with the standard library."""
    import pydoc_data.topics

    from minimind.model import MiniMindConfig, MiniMindForCausalLM
    from minimind.modeldir import save_model_dir
    from minimind.tokenizer import load_tokenizer
    from minimind.tokenizer.train import save_tokenizer, train_tokenizer

    texts = list(pydoc_data.topics.topics.values())
    save_tokenizer(train_tokenizer(texts, vocab_size=2048, show_progress=False), out / "tokenizer")
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig.from_preset(preset, vocab_size=2048, **DEMO_SHAPES[preset])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.08 + (1.0 if p.ndim == 1 else 0.0))
    return save_model_dir(model, load_tokenizer(out / "tokenizer"), out / "model")


def open_llama(path: Path, repack: bool, **kwargs):
    """`llama_cpp.Llama` over a GGUF file; repack=False loads it without llama.cpp's extra buffer types (the
    repacked and AMX layouts it would otherwise choose for quantized weights), which the `Llama` class has no
    argument for: its model parameters start from `llama_model_default_params`, wrapped here meanwhile."""
    import llama_cpp

    with _default_model_params(llama_cpp.llama_cpp, use_extra_bufts=repack):
        return llama_cpp.Llama(model_path=str(path), **kwargs)


@contextlib.contextmanager
def _default_model_params(module, **fields):
    real = module.llama_model_default_params

    def params():
        chosen = real()
        for name, value in fields.items():
            setattr(chosen, name, value)
        return chosen

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = real


def our_greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy continuation with the HF generate loop (KV cache); returns (new tokens, tokens/s)."""
    prompt = torch.tensor([ids])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids) :].tolist(), n / (time.perf_counter() - start)


def llama_cpp_greedy(llm, ids: list[int], n: int) -> tuple[list[int], np.ndarray, float]:
    """Greedy continuation in llama.cpp; returns (new tokens, prompt logits (T, vocab), tokens/s)."""
    llm.reset()
    llm.eval(ids)
    prompt_logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    new = []
    start = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(token)
        llm.eval([token])
    return new, prompt_logits, n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="model directory (None = build a random tiny demo model)"
    )
    parser.add_argument("--preset", choices=list(DEMO_SHAPES), default="tiny",
                        help="shape of the random demo model when --model is not given")
    parser.add_argument("--dtypes", nargs="+", default=["f32", "f16", "q8_0"], help="GGUF types to try")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to continue")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--repack", action="store_true",
                        help="let llama.cpp repack quantized weights into its faster layouts (crashes on this "
                             "machine's CPU)")
    args = parser.parse_args(argv)
    try:
        from llama_cpp import GGML_TYPE_F32
    except ImportError:
        print(INSTALL_HINT)
        return 0

    from minimind.convert.gguf import export_gguf, gguf_architecture
    from minimind.modeldir import load_model_dir

    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    model_dir = Path(args.model) if args.model else demo_model_dir(work, args.preset)
    model, tokenizer = load_model_dir(model_dir)
    ids = tokenizer(args.prompt).input_ids
    with torch.no_grad():
        ours_logits = model(torch.tensor([ids])).logits[0].numpy()
    ours_new, ours_speed = our_greedy(model, ids, args.new_tokens)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {model_dir}: {n_params:,} parameters ({gguf_architecture(model.config)} in llama.cpp), "
          f"prompt {len(ids)} tokens")
    print(f"ours (PyTorch, {torch.get_num_threads()} threads): {ours_speed:.1f} tokens/s")
    status = 0
    for dtype in args.dtypes:
        path = export_gguf(model_dir, work / f"model-{dtype}.gguf", dtype)
        llm = open_llama(
            path,
            args.repack,
            n_ctx=len(ids) + args.new_tokens + 8,
            n_threads=args.threads,
            logits_all=True,
            type_k=GGML_TYPE_F32,  # llama.cpp caches K/V in f16 by default; f32 isolates the weights' dtype
            type_v=GGML_TYPE_F32,
            verbose=False,
        )
        same_tokens = llm.tokenize(args.prompt.encode(), add_bos=False, special=True) == ids
        theirs_new, theirs_logits, speed = llama_cpp_greedy(llm, ids, args.new_tokens)
        agree = next((i for i, (a, b) in enumerate(zip(ours_new, theirs_new)) if a != b), len(ours_new))
        diff = float(np.abs(theirs_logits - ours_logits).max())
        tokens = "same" if same_tokens else "DIFFERS"
        print(
            f"{dtype:>5}: {path.stat().st_size / 1e6:6.2f} MB | tokenizer {tokens} "
            f"| max |logit diff| {diff:.2e} | greedy agrees {agree}/{len(ours_new)} | {speed:.1f} tokens/s"
        )
        if dtype == "f32" and (agree < len(ours_new) or not same_tokens):
            status = 1
        del llm
    print(f"continuation (ours): {tokenizer.decode(ours_new)!r}")
    return status


if __name__ == "__main__":
    sys.exit(main())

"""Decode speed of the Engine against HF `generate` on the same model, at batch 1 and batch 8.

    python bench/decode.py                                 # preset small, random weights, 128 new tokens
    python bench/decode.py --new-tokens 32                 # quick
    python bench/decode.py --model runs/sft --device cuda  # a real model directory

Both sides decode greedily from the same prompts (random token ids, all of one length) with eos disabled,
so both produce exactly --new-tokens tokens per row. Decode tokens/s = rows x (new_tokens - 1) divided by
(time for new_tokens - time for 1 token): the prefill and the first token cancel out. The engine's time
includes its detokenization and stop checks (what a user of it pays); HF's does not. Best of --repeats runs.
The last line is the batch-1 figure: `decode: ratio=<ours/peer> (ours <tok/s>, peer <tok/s>)`.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minimind.device import resolve_device  # noqa: E402
from minimind.infer import Engine  # noqa: E402
from minimind.model import MiniMindConfig, MiniMindForCausalLM  # noqa: E402


def bench_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer of the model's vocabulary size, trained in seconds on synthetic text."""
    from minimind.tokenizer import load_tokenizer
    from minimind.tokenizer.train import save_tokenizer, train_tokenizer

    rng = random.Random(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)] + list("abcdefghijklmnopqrstuvwxyz ")
    texts = ["".join(rng.choice(chars) for _ in range(300)) for _ in range(800)]
    out = tempfile.mkdtemp(prefix="bench-tokenizer-")
    save_tokenizer(train_tokenizer(texts, vocab_size=vocab_size, show_progress=False), out)
    return load_tokenizer(out)


def load(args: argparse.Namespace, device: str):
    """(model, tokenizer): a model directory, or a preset with random weights."""
    if args.model:
        engine = Engine.from_pretrained(args.model, device=device, dtype=args.dtype)
        return engine.model, engine.tokenizer
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig.from_preset(args.preset)).eval().to(device)
    if args.dtype:
        model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype])
    return model, bench_tokenizer(model.config.vocab_size)


def timed(fn, device: str, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def decode_rate(run, rows: int, new_tokens: int, device: str, repeats: int) -> float:
    """Decode tokens/s: the difference between generating new_tokens and generating 1."""
    full = timed(lambda: run(new_tokens), device, repeats)
    first = timed(lambda: run(1), device, repeats)
    return rows * (new_tokens - 1) / max(full - first, 1e-9)


def engine_runner(engine: Engine, prompts: list[list[int]]):
    """n -> generate n tokens for every prompt with the Engine (eos ignored)."""

    def run(n: int) -> None:
        engine.completions(prompts, max_new_tokens=n, ignore_eos=True)

    return run


def hf_runner(model: torch.nn.Module, ids: torch.Tensor):
    """n -> generate n tokens for every row with HF `generate` (greedy, eos disabled)."""

    @torch.inference_mode()
    def run(n: int) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                       eos_token_id=None, pad_token_id=0)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model preset with random weights (ignored with --model)")
    parser.add_argument("--model", default=None, help="benchmark a model directory instead of a preset")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length per row")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (best is kept)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="weights dtype")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    device = resolve_device(args.device)
    model, tokenizer = load(args, device)
    engine = Engine(model, tokenizer)
    generator = torch.Generator().manual_seed(0)
    print(f"model: {args.model or 'preset ' + args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params), device {device}, dtype {next(model.parameters()).dtype}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens")
    results = {}
    for rows in args.batch_sizes:
        prompts = torch.randint(3, len(tokenizer), (rows, args.prompt_tokens), generator=generator)
        results[rows] = (
            decode_rate(engine_runner(engine, prompts.tolist()), rows, args.new_tokens, device, args.repeats),
            decode_rate(hf_runner(model, prompts.to(device)), rows, args.new_tokens, device, args.repeats),
        )
        print(f"batch {rows}: engine {results[rows][0]:.1f} tok/s, hf generate {results[rows][1]:.1f} tok/s")
    for rows, (mine, theirs) in results.items():
        if rows != 1:
            print(f"decode batch {rows}: ratio={mine / theirs:.2f} (ours {mine:.1f}, peer {theirs:.1f})")
    if 1 in results:
        mine, theirs = results[1]
        print(f"decode: ratio={mine / theirs:.2f} (ours {mine:.1f}, peer {theirs:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time to first token of a long chat's next turn with the Engine's prefix cache against without it, and prefill
of a fresh prompt against llama.cpp on our own GGUF export.

    python bench/prefix.py                       # preset small, random weights: 10th turn after ~1,500 tokens
    python bench/prefix.py --repeats 5 --prefill-tokens 1024
    python bench/prefix.py --threads 1           # a machine with more runnable threads than cores
    python bench/prefix.py --quick               # tiny shapes, one repetition: does it run

The chat is token ids (the chat template adds a few tokens per turn and changes nothing measured here): each
turn is --user-tokens random ids after the history, answered greedily with --answer-tokens tokens, eos
ignored; the 10th turn's prompt holds 9 earlier turns and answers (~1,500 tokens with the defaults). Every
repetition builds a fresh conversation on the prefix-cached engine (turns 1-9, untimed), then times the 10th
turn's first token (its prefill: `add` + one `step`) on that engine and on an engine without the cache, in
alternating order. The best repetition of each side counts.

Prefill: a fresh --prefill-tokens prompt (random ids, nothing cached) to its first token, our Engine against
llama-cpp-python on `minimind convert --to gguf --dtype f32` of the same weights (`Llama.eval` of the prompt
and a greedy pick; its default f16 KV cache, the same thread count as torch), interleaved. f32, since q8_0
crashes llama.cpp on some CPUs (this bench's own). Without llama-cpp-python that line is skipped.

Prints `prefill: ratio=<ours/llama.cpp>` (tokens/s), then last `prefix: ratio=<cached/uncached>` (first
tokens/s of the 10th turn, i.e. how many times sooner the first token comes).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from minimind.device import resolve_device  # noqa: E402
from minimind.infer import Engine  # noqa: E402


def first_token_seconds(engine: Engine, prompt: list[int]) -> float:
    """Seconds from queuing `prompt` to its first token (the prefill step); the request is then released."""
    common.sync(engine.device)
    start = time.perf_counter()
    request = engine.add(prompt, max_new_tokens=1, ignore_eos=True)
    while not any(out.request_id == request for out in engine.step()):
        pass
    common.sync(engine.device)
    seconds = time.perf_counter() - start
    engine.release(request)
    return seconds


def conversation(engine: Engine, turns: int, user_tokens: int, answer_tokens: int, seed: int) -> list[int]:
    """The prompt of turn `turns`: turns - 1 user turns of random ids, each answered by `engine`, then one more."""
    ids = torch.Generator().manual_seed(seed)
    history: list[int] = []
    for _ in range(turns - 1):
        prompt = history + torch.randint(3, engine.vocab_size, (user_tokens,), generator=ids).tolist()
        answer = engine.completions([prompt], max_new_tokens=answer_tokens, temperature=0.0, ignore_eos=True)[0]
        history = prompt + answer.token_ids
    return history + torch.randint(3, engine.vocab_size, (user_tokens,), generator=ids).tolist()


def llama_cpp_prefill(model, tokenizer, prompt: list[int]):
    """-> a runner that prefills `prompt` in llama.cpp and picks its first token, or None without llama_cpp."""
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (pip install -e '.[llamacpp]'); prefill skipped")
        return None
    import numpy as np

    from minimind.convert.gguf import export_gguf
    from minimind.modeldir import save_model_dir

    work = Path(common.scratch_dir("bench-prefix-gguf-"))
    model_dir = save_model_dir(model.float().cpu(), tokenizer, work / "model")
    path = export_gguf(model_dir, work / "model-f32.gguf", "f32")
    threads = torch.get_num_threads()
    llm = Llama(model_path=str(path), n_ctx=len(prompt) + 8, n_batch=max(512, len(prompt)), n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def run() -> None:
        llm.reset()
        llm.eval(prompt)
        int(np.argmax(llm.scores[llm.n_tokens - 1]))

    return run


def main(argv: list[str] | None = None) -> int:
    parser = common.bench_parser(__doc__)
    parser.add_argument("--preset", default="small", help="model preset with random weights")
    parser.add_argument("--turns", type=int, default=10, help="the turn whose first token is timed")
    parser.add_argument("--user-tokens", type=int, default=150, help="tokens of each user turn")
    parser.add_argument("--answer-tokens", type=int, default=16, help="tokens of each answer")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the llama.cpp case")
    parser.add_argument("--no-llamacpp", action="store_true", help="skip the prefill case against llama.cpp")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and llama.cpp) threads (default: torch's); 1 on a machine busier than its "
                             "cores, where every operator's thread barrier waits on the scheduler")
    common.add_bench_arguments(parser, repeats=(3, "timed repetitions, each on a fresh conversation (best is kept)"),
                        device="cpu", dtype=(None, "weights dtype"),
                        quick="tiny model, 3 turns of 24 tokens, one repetition (smoke test)", json=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.turns, args.user_tokens, args.answer_tokens = "tiny", 3, 24, 4
        args.prefill_tokens, args.repeats = 32, 1
    if args.turns < 2:
        parser.error("--turns must be at least 2 (the first turn has nothing to reuse)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    history = (args.turns - 1) * (args.user_tokens + args.answer_tokens)
    model = common.preset_model(args.preset, max_seq_len=max(4096, 2 * (history + args.user_tokens))).eval()
    model = model.to(device, common.DTYPES[args.dtype]) if args.dtype else model.to(device)
    tokenizer, _ = common.bench_tokenizer(model.config.vocab_size)
    print(common.machine_line())
    print(f"model: preset {args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), device "
          f"{device}, dtype {next(model.parameters()).dtype}; turn {args.turns} after {history} tokens of history, "
          f"best of {args.repeats}")
    # Engines share the weights (an engine lays out its own copy of the modules, not of the tensors).
    cached = Engine(model, tokenizer, prefix_cache_tokens=4 * (history + args.user_tokens))
    plain = Engine(model, tokenizer)
    figures: dict[str, list[float]] = {"cached": [], "uncached": []}
    reused = 0
    for repetition in range(args.repeats + 1):  # the first round warms both engines up and is not counted
        prompt = conversation(cached, args.turns, args.user_tokens, args.answer_tokens, seed=repetition)
        hits = cached.prefix_cache_stats.hit_tokens
        order = ("cached", "uncached") if repetition % 2 == 0 else ("uncached", "cached")
        times = {name: first_token_seconds(cached if name == "cached" else plain, prompt) for name in order}
        reused = cached.prefix_cache_stats.hit_tokens - hits
        if repetition:
            for name, seconds in times.items():
                figures[name].append(seconds)
    best = {name: min(values) for name, values in figures.items()}
    print(f"turn {args.turns}: prompt {len(prompt)} tokens, {reused} reused; first token "
          f"{best['cached'] * 1e3:.1f} ms with the prefix cache, {best['uncached'] * 1e3:.1f} ms without")
    record = {"bench": "prefix", "device": str(device), "preset": args.preset, "prompt_tokens": len(prompt),
              "reused_tokens": reused, "ttft_cached_s": best["cached"], "ttft_uncached_s": best["uncached"],
              "machine": common.machine_line()}
    fresh = torch.randint(3, model.config.vocab_size, (args.prefill_tokens,),
                          generator=torch.Generator().manual_seed(1000)).tolist()
    peer = None if args.no_llamacpp or device.type != "cpu" else llama_cpp_prefill(model, tokenizer, fresh)
    if peer is not None:
        times = common.interleaved({"ours": lambda: first_token_seconds(plain, fresh), "llama.cpp": peer}, args.repeats)
        ours, theirs = min(times["ours"]), min(times["llama.cpp"])
        print(f"prefill {len(fresh)} tokens: first token {ours * 1e3:.1f} ms ours, {theirs * 1e3:.1f} ms llama.cpp f32")
        record.update(prefill_tokens=len(fresh), prefill_ours_s=ours, prefill_llamacpp_s=theirs)
        print(common.ratio_line("prefill", len(fresh) / ours, len(fresh) / theirs, "tokens/s"))
    common.append_json(args.json, record)
    print(common.ratio_line("prefix", 1 / best["cached"], 1 / best["uncached"], "first tokens/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

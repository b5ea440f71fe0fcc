"""Decode speed of the Engine against HF `generate` (batch 1 and 8) and llama.cpp on our own GGUF export.

    python bench/decode.py                                 # preset small, random weights, 128 new tokens
    python bench/decode.py --new-tokens 32 --repeats 2     # quicker
    python bench/decode.py --model runs/sft --device cuda  # a real model directory
    python bench/decode.py --quick                         # tiny shapes, one repetition: does it run

Cases, all greedy from the same prompts (random token ids, all of one length) with eos ignored, so every
side produces exactly --new-tokens tokens per row:
  engine       our Engine, the model's dtype            hf           HF `generate` (Llama; Qwen3 for QK-norm), same weights
  engine-default  the Engine as `minimind generate/chat/serve` build it with no flags (compiled decode step
               from the compile cache on CPU/CUDA, prefix cache on)
  engine-int8  Engine(quantize="int8") (CPU only)       engine-compile  Engine(compile=True) (--compile)
  engine-int8-compile  both (--compile, CPU only)
  engine-int4  Engine(quantize="int4") (CPU only)       engine-int4-compile  both (--compile, CPU only)
  llama.cpp-f32 / -f16 / -q8_0 / -q4_0   llama-cpp-python on `minimind convert --to gguf` of the same weights,
               batch 1, when `llama_cpp` is importable (its default f16 KV cache, same thread count as
               torch; tokens drawn by its own greedy sampler through `Llama.generate`). Loaded without
               llama.cpp's repacked weight layouts unless --llama-repack: on CPUs with AMX (this machine's)
               llama.cpp crashes in them for q8_0 and q4_0 files
Decode tokens/s = rows x (new_tokens - 1) / (time for new_tokens - time for 1 token): prefill and the
first token cancel out. Time is wall time; with OMP_NUM_THREADS=1 --cpu-time counts the calling thread's CPU
time instead (every side computes on that thread), for a machine other jobs load. The engine's time includes detokenization and stop checks (what a user pays); HF's
and llama.cpp's do not. Cases run interleaved within each repetition; the best repetition counts.
The last line is the batch-1 fp32 engine against HF: `decode: ratio=<ours/peer> (ours <tok/s>, peer <tok/s>)`;
`decode batch 1 engine-default vs llama.cpp-f32: ratio=…` is what a user meets with no flags.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    DTYPES,
    add_bench_arguments,
    append_json,
    bench_parser,
    bench_tokenizer,
    hf_twin,
    interleaved,
    machine_line,
    ratio_line,
    scratch_dir,
)

from minimind.convert.gguf import GGUF_DTYPES  # noqa: E402
from minimind.device import resolve_device  # noqa: E402
from minimind.infer import Engine  # noqa: E402
from minimind.model import MiniMindConfig, MiniMindForCausalLM  # noqa: E402


def load(args: argparse.Namespace, device: torch.device):
    """(model, tokenizer, model directory or None): a model directory, or a preset with random weights."""
    if args.model:
        engine = Engine.from_pretrained(args.model, device=str(device), dtype=args.dtype)
        return engine.model, engine.tokenizer, Path(args.model)
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig.from_preset(args.preset)).eval().to(device)
    if args.dtype:
        model.to(DTYPES[args.dtype])
    tokenizer, _ = bench_tokenizer(model.config.vocab_size)
    return model, tokenizer, None


def default_engine(model, tokenizer, device: torch.device, cache_dir: str | None) -> Engine:
    """The Engine `minimind generate/chat/serve` build with no flags (compile by default, its compile cache, the
    prefix cache), warmed up as they are; the compile cache's default directory unless `cache_dir` is given."""
    from minimind.infer.compile_cache import default_compile_cache
    from minimind.infer.options import PREFIX_CACHE_TOKENS, compile_by_default

    compiled = compile_by_default(None, device)
    engine = Engine(model, tokenizer, compile=compiled, prefix_cache_tokens=PREFIX_CACHE_TOKENS,
                    compile_cache=(cache_dir or default_compile_cache()) if compiled else None)
    engine.warm_up(batches=True)
    return engine


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


def llama_cpp_runners(model, tokenizer, model_dir: Path | None, prompt: list[int], max_tokens: int,
                      gguf_types: list[str], repack: bool = False) -> dict:
    """name -> runner for each GGUF type, or {} when llama-cpp-python is not installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp: llama-cpp-python is not installed (pip install -e '.[llamacpp]'); skipped")
        return {}
    from gguf_llamacpp import open_llama

    from minimind.convert.gguf import export_gguf
    from minimind.modeldir import save_model_dir

    work = Path(scratch_dir("bench-gguf-"))
    if model_dir is None:
        model_dir = save_model_dir(model.float().cpu(), tokenizer, work / "model")
    runners = {}
    for gguf_type in gguf_types:
        path = export_gguf(model_dir, work / f"model-{gguf_type}.gguf", gguf_type)
        llm = open_llama(path, repack, n_ctx=len(prompt) + max_tokens + 8, n_threads=torch.get_num_threads(),
                         n_threads_batch=torch.get_num_threads(), verbose=False)

        def run(n: int, llm=llm) -> None:
            for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), start=1):
                if i == n:
                    break

        runners[f"llama.cpp-{gguf_type}"] = run
    return runners


def rates(runners: dict, rows: int, new_tokens: int, device, repeats: int, cpu_time: bool = False) -> dict[str, float]:
    """Decode tokens/s of each runner: the time of new_tokens minus the time of 1, interleaved."""
    cases = {}
    for name, run in runners.items():
        cases[f"{name}:full"] = lambda run=run: run(new_tokens)
        cases[f"{name}:first"] = lambda run=run: run(1)
    times = interleaved(cases, repeats, device, clock=time.thread_time if cpu_time else time.perf_counter)
    return {name: rows * (new_tokens - 1) / max(min(times[f"{name}:full"]) - min(times[f"{name}:first"]), 1e-9)
            for name in runners}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--preset", default="small", help="model preset with random weights (ignored with --model)")
    parser.add_argument("--model", default=None, help="benchmark a model directory instead of a preset")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length per row")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    add_bench_arguments(parser, repeats=(3, "timed runs per figure (best is kept)"), device="auto",
                        dtype=(None, "weights dtype"))
    parser.add_argument("--no-int8", action="store_true", help="skip the Engine(quantize='int8') case")
    parser.add_argument("--no-int4", action="store_true", help="skip the Engine(quantize='int4') case")
    parser.add_argument("--llama-repack", action="store_true",
                        help="let llama.cpp repack quantized weights into its faster layouts (crashes on CPUs "
                             "with AMX, this machine's)")
    parser.add_argument("--no-hf", action="store_true", help="skip HF generate")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with the calling thread's CPU time instead of wall time: with OMP_NUM_THREADS=1 "
                             "every side computes on that thread, so on a loaded machine the time other processes "
                             "hold the core is not counted (cache and memory contention still is)")
    parser.add_argument("--compile", action="store_true", help="also time Engine(compile=True)")
    parser.add_argument("--no-default", action="store_true",
                        help="skip engine-default (what generate/chat/serve run with no flags)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="engine-default's compile cache (default: the CLI's, so only a first run compiles)")
    parser.add_argument("--gguf-types", nargs="*", default=["f32", "f16", "q8_0", "q4_0"], choices=GGUF_DTYPES,
                        help="llama.cpp cases at batch 1 (none: skip llama.cpp)")
    add_bench_arguments(parser, quick="tiny model, 8 tokens, one repetition (smoke test)", json=True)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.new_tokens, args.repeats = "tiny", 8, 1
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2")
    if args.cpu_time and torch.get_num_threads() != 1:
        parser.error("--cpu-time needs one thread (OMP_NUM_THREADS=1)")
    device = resolve_device(args.device)
    model, tokenizer, model_dir = load(args, device)
    generator = torch.Generator().manual_seed(0)
    print(machine_line())
    print(f"model: {args.model or 'preset ' + args.preset} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params), device {device}, dtype {next(model.parameters()).dtype}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, best of {args.repeats}")
    peer = None if args.no_hf else hf_twin(model).eval()  # before the engines re-lay the weights out
    # Each engine gets its own copy: an engine may re-lay its model's weights out (see infer/layout.py).
    engines = {"engine": Engine(copy.deepcopy(model), tokenizer)}
    if not args.no_default:
        engines["engine-default"] = default_engine(copy.deepcopy(model), tokenizer, device, args.compile_cache)
    if not args.no_int8 and device.type == "cpu":
        engines["engine-int8"] = Engine(model, tokenizer, quantize="int8")
    if args.compile:
        engines["engine-compile"] = Engine(copy.deepcopy(model), tokenizer, compile=True)
        if not args.no_int8 and device.type == "cpu":
            engines["engine-int8-compile"] = Engine(model, tokenizer, quantize="int8", compile=True)
    if not args.no_int4 and device.type == "cpu":
        engines["engine-int4"] = Engine(model, tokenizer, quantize="int4")
        if args.compile:
            engines["engine-int4-compile"] = Engine(model, tokenizer, quantize="int4", compile=True)
    results: dict[int, dict[str, float]] = {}
    for rows in args.batch_sizes:
        prompts = torch.randint(3, len(tokenizer), (rows, args.prompt_tokens), generator=generator)
        runners = {name: engine_runner(engine, prompts.tolist()) for name, engine in engines.items()}
        if not args.no_hf:
            runners["hf"] = hf_runner(peer, prompts.to(device))
        if rows == 1 and args.gguf_types:
            runners.update(llama_cpp_runners(model, tokenizer, model_dir, prompts[0].tolist(),
                                             args.prompt_tokens + args.new_tokens, args.gguf_types,
                                             args.llama_repack))
        results[rows] = rates(runners, rows, args.new_tokens, device, args.repeats, args.cpu_time)
        print(f"batch {rows}: " + ", ".join(f"{name} {rate:.1f}" for name, rate in results[rows].items())
              + " tokens/s")
    append_json(args.json, {"bench": "decode", "device": str(device), "model": args.model or args.preset,
                            "results": results, "machine": machine_line()})
    pairs = [("engine-default", "llama.cpp-f32"), ("engine-default", "engine"), ("engine", "llama.cpp-f32"), ("engine-compile", "llama.cpp-f32"), ("engine-int8", "llama.cpp-f16"),
             ("engine-int8-compile", "llama.cpp-f16"), ("engine-int8-compile", "llama.cpp-q8_0"),
             ("engine-compile", "engine"), ("engine-compile", "hf"), ("engine-int8", "hf"),
             ("engine-int8-compile", "hf"), ("engine", "hf"), ("engine-default", "hf")]
    # the quantized modes against llama.cpp's of the same bits per weight, and against each other
    pairs += [("engine-int8", "llama.cpp-q8_0"), ("engine-int4", "llama.cpp-q4_0"),
              ("engine-int4-compile", "llama.cpp-q4_0"), ("engine-int4", "engine-int8"),
              ("engine-int4-compile", "engine-int8-compile")]
    for rows, figures in results.items():
        for ours, peer in pairs:
            if ours in figures and peer in figures and (rows, ours, peer) != (1, "engine", "hf"):
                print(ratio_line(f"decode batch {rows} {ours} vs {peer}", figures[ours], figures[peer], "tokens/s"))
    if 1 in results and "hf" in results[1]:
        print(ratio_line("decode", results[1]["engine"], results[1]["hf"], "tokens/s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Flags shared by the verbs that load a model and generate: `generate`, `chat` (and `eval --task exact`).

Sampling flags default to the model directory's generation_config.json (what the trainer wrote, e.g.
temperature 0.85, top-p 0.85), so a model answers the same way from the CLI, the server and the web UI;
any flag given on the command line wins. `--temperature 0` is greedy.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from minimind.device import dtype_name, resolve_device
from minimind.errors import UserError
from minimind.hub import model_dir
from minimind.infer.quantize import QUANTIZE_CHOICES
from minimind.infer.sampling import SamplingParams
from minimind.modeldir import adapter_source, read_json_object

PREFIX_CACHE_TOKENS = 8192  # default bound of the prefix cache, in tokens
COMPILE_ENV = "MINIMIND_COMPILE"  # 0/off/false: eager decoding unless --compile is given


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=model_dir, help="model directory written by any stage")
    add_engine_arguments(parser)
    add_prefix_cache_arguments(parser)


def add_prefix_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """`--prefix-cache-tokens N` / `--no-prefix-cache` (generate, chat, serve, eval, web): reuse of shared prompt
    prefixes."""
    parser.add_argument("--prefix-cache-tokens", type=_non_negative, default=PREFIX_CACHE_TOKENS, metavar="N",
                        help="keep the keys/values of up to N tokens of finished requests, so a prompt that "
                             "starts like one of them (a chat's history, a shared system prompt) prefills only "
                             "the rest; least recently used first out; memory: N x 2 x layers x kv heads x "
                             f"head_dim x dtype bytes (default: {PREFIX_CACHE_TOKENS}; 0 = off)")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache_tokens", action="store_const", const=0,
                        help="turn the prefix cache off (the same as --prefix-cache-tokens 0)")


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of tokens >= 0, got {value}")
    return value


def utf8_text(text: str, what: str) -> str:
    """`text` as read from the command line or stdin; UserError naming `what` where it is not UTF-8 (Python keeps
    such bytes as lone surrogates, which no tokenizer takes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        found = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise UserError(f"{what} is not UTF-8 text ({found} at character {err.start})") from None
    return text


def not_utf8(err: UnicodeDecodeError, what: str) -> UserError:
    """The one line for input that a strictly decoding stdin or terminal could not read as UTF-8."""
    return UserError(f"{what} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at byte {err.start})")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """How the engine runs a model: `--device --dtype --quantize --compile/--no-compile --compile-cache
    --no-prepack` (also `minimind web`)."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (cuda if available)")
    parser.add_argument("--dtype", default=None, type=dtype_name, choices=["fp32", "bf16", "fp16"],
                        help="weights dtype (default: as saved; float32, bfloat16 and float16 are accepted too)")
    parser.add_argument("--quantize", default=None, choices=list(QUANTIZE_CHOICES),
                        help="CPU inference with fewer weight bytes per token: int8 (one scale per output "
                             "channel, about 4x fewer) or int4 (llama.cpp's q4_0 groups of 32, about 7x fewer); "
                             "default: none")
    parser.add_argument("--compile", action="store_true", default=None,
                        help="compile single-sequence decoding (the default of generate, chat, serve and web on CPU "
                             "and CUDA; 1.5-2x the tokens/s of eager decoding on CPU). The first start on a machine compiles (15-60 s on 2 "
                             "CPU cores, before the first answer); the result is kept in --compile-cache, so "
                             "later starts of any model of the same shape load it in seconds. Batches of "
                             "several sequences run as without it")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="decode eagerly: no compilation and nothing written to the compile cache "
                             f"(also the default when the environment sets {COMPILE_ENV}=0)")
    parser.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="where compiled decode steps are kept (default: $MINIMIND_CACHE/compile, else "
                             "~/.cache/minimind/compile; delete it to compile afresh)")
    parser.add_argument("--no-prepack", action="store_true",
                        help="CPU: skip the oneDNN copy of the float weights the engine keeps for faster "
                             "matmuls (half the weight memory, slower decoding)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the model's generation_config.json)")
    group.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    group.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens; 0 = off")
    group.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]; 1 = off")
    group.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top one; 0 = off")
    group.add_argument("--repetition-penalty", type=float, default=None, help="CTRL-style penalty; 1 = off")
    group.add_argument("--presence-penalty", type=float, default=None, help="OpenAI presence penalty; 0 = off")
    group.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI frequency penalty; 0 = off")
    group.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens")
    group.add_argument("--stop", action="extend", nargs="+", default=None, metavar="TEXT",
                       help="stop when any of these texts appears (repeatable); the stop text is not printed")
    group.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")


def generation_defaults(model_dir: str | Path) -> dict:
    """Sampling defaults from `model_dir/generation_config.json` (greedy when it says do_sample false).

    Out-of-range values fail here, naming the file, so a server never starts only to refuse every request.
    """
    path = adapter_source(Path(model_dir), ("generation_config.json",)) / "generation_config.json"
    if not path.is_file():
        return {}
    data = read_json_object(path)
    if not data.get("do_sample", False):
        chosen = {"temperature": 0.0, **_pick(data, ("max_new_tokens",))}
    else:
        chosen = _pick(data, ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens"))
    try:
        SamplingParams(**chosen)
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    return chosen


def _pick(data: dict, keys: tuple[str, ...]) -> dict:
    return {k: data[k] for k in keys if data.get(k) is not None}


def sampling_from_args(args: argparse.Namespace) -> dict:
    """SamplingParams keyword arguments: the model's defaults overridden by the flags that were given."""
    chosen = generation_defaults(args.model)
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "max_new_tokens", "stop", "seed"):
        value = getattr(args, name)
        if value is not None:
            chosen[name] = value
    return chosen


def compile_by_default(requested: bool | None, device: torch.device) -> bool:
    """Whether to compile the decode step: as `--compile`/`--no-compile` say, else on for CPU and CUDA unless the
    environment sets MINIMIND_COMPILE to 0, off or false (other devices decode eagerly)."""
    if requested is not None:
        return requested
    return compile_allowed() and device.type in ("cpu", "cuda")


def compile_allowed() -> bool:
    """False when the environment sets MINIMIND_COMPILE to 0, off, false or no (eager decoding everywhere)."""
    return os.environ.get(COMPILE_ENV, "").strip().lower() not in ("0", "off", "false", "no")


def compile_cache_dir(args: argparse.Namespace) -> Path:
    """`--compile-cache`, else the default compile cache directory."""
    from minimind.infer.compile_cache import default_compile_cache

    given = getattr(args, "compile_cache", None)
    return Path(given).expanduser() if given else default_compile_cache()


def load_engine(args: argparse.Namespace, compile_default: bool = True, batches: bool = False, **engine_kwargs):
    """The Engine for `--model` and the `add_engine_arguments` flags.

    When it compiles (`compile_by_default`; with `compile_default=False` only on `--compile`: `eval`, whose
    scoring is batched prefill), the decode step is compiled, or loaded from the compile cache,
    before this returns, saying so on stderr, so that no answer waits on it.
    A default (not asked for) compilation that fails leaves the engine decoding eagerly, with a note.
    `batches` (the server, the web chat): the step of several rows too, where the engine compiles one.
    """
    from minimind.infer.engine import Engine

    device = resolve_device(args.device)
    requested = getattr(args, "compile", None)
    compile = compile_by_default(requested, device) if compile_default else bool(requested)
    engine = Engine.from_pretrained(args.model, device=str(device), dtype=args.dtype,
                                    quantize=getattr(args, "quantize", None), compile=compile,
                                    compile_cache=compile_cache_dir(args) if compile else None,
                                    prepack=not getattr(args, "no_prepack", False),
                                    prefix_cache_tokens=getattr(args, "prefix_cache_tokens", 0), **engine_kwargs)
    if compile:
        warm_compiled(engine, explicit=requested is True, batches=batches)
    return engine


def warm_compiled(engine, explicit: bool, batches: bool = False) -> None:
    """Compile (or load) the engine's decode step now (with `batches`, its step of several rows too: a server),
    reporting on stderr; an implicit one that fails is turned off (eager decoding), an explicit `--compile` that
    fails raises."""
    step = engine._decode_step
    if step is None:
        return
    if step.loaded_for(batches):
        print(f"compiled decode step loaded from {step.cache_path.parent}", file=sys.stderr, flush=True)
    else:
        when = ("once for this model shape and machine" if step.cacheable else
                "at every start: an MoE model's routing depends on the data, so its step is not cached")
        print(f"compiling the decode step, {when} (15-60 s on 2 CPU cores; --no-compile skips it)...",
              file=sys.stderr, flush=True)
    try:
        seconds = engine.warm_up(batches=batches)
    except Exception as err:
        if explicit:
            raise
        engine._decode_step = None
        print(f"compiling failed ({type(err).__name__}: {err}); decoding eagerly", file=sys.stderr, flush=True)
        return
    if not step.loaded:
        print(f"compiled in {seconds:.1f} s", file=sys.stderr, flush=True)

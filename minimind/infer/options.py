"""Flags shared by the verbs that load a model and generate: `generate`, `chat` (and `eval --task exact`).

Sampling flags default to the model directory's generation_config.json (what the trainer wrote, e.g.
temperature 0.85, top-p 0.85), so a model answers the same way from the CLI, the server and the web UI;
any flag given on the command line wins. `--temperature 0` is greedy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minimind.device import dtype_name, resolve_device
from minimind.errors import UserError
from minimind.hub import model_dir
from minimind.infer.quantize import QUANTIZE_CHOICES
from minimind.infer.sampling import SamplingParams
from minimind.modeldir import adapter_source, read_json_object

PREFIX_CACHE_TOKENS = 8192  # default bound of the prefix cache, in tokens


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=model_dir, help="model directory written by any stage")
    add_engine_arguments(parser)
    add_prefix_cache_arguments(parser)


def add_prefix_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """`--prefix-cache-tokens N` / `--no-prefix-cache` (generate, chat, serve, eval): reuse of shared prompt prefixes."""
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


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """How the engine runs a model: `--device --dtype --quantize --compile --no-prepack` (also `minimind web`)."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (cuda if available)")
    parser.add_argument("--dtype", default=None, type=dtype_name, choices=["fp32", "bf16", "fp16"],
                        help="weights dtype (default: as saved; float32, bfloat16 and float16 are accepted too)")
    parser.add_argument("--quantize", default=None, choices=list(QUANTIZE_CHOICES),
                        help="CPU inference with fewer weight bytes per token: int8 (one scale per output "
                             "channel, about 4x fewer) or int4 (llama.cpp's q4_0 groups of 32, about 7x fewer); "
                             "default: none")
    parser.add_argument("--compile", action="store_true",
                        help="compile single-sequence decoding with torch.compile, once (15-60 s on 2 CPU "
                             "cores; chat, serve and web do it at start, generate and eval at the first "
                             "answer); tokens then come 1.5-2x faster on CPU (batches of several sequences "
                             "run as without it)")
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


def load_engine(args: argparse.Namespace, warm_up: bool = False, **engine_kwargs):
    """The Engine for `--model` and the `add_engine_arguments` flags.

    warm_up: with `--compile`, compile the decode step before returning (interactive commands and the server,
    so that no answer waits on it), saying so on stderr.
    """
    from minimind.infer.engine import Engine

    engine = Engine.from_pretrained(args.model, device=str(resolve_device(args.device)), dtype=args.dtype,
                                    quantize=getattr(args, "quantize", None),
                                    compile=getattr(args, "compile", False),
                                    prepack=not getattr(args, "no_prepack", False),
                                    prefix_cache_tokens=getattr(args, "prefix_cache_tokens", 0), **engine_kwargs)
    if warm_up and getattr(args, "compile", False):
        print("compiling the decode step (--compile; 15-60 s on 2 CPU cores)...", file=sys.stderr, flush=True)
        print(f"compiled in {engine.warm_up():.1f} s", file=sys.stderr, flush=True)
    return engine

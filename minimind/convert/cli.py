"""`minimind convert`: export a model directory to another format, import MiniMind2 weights, merge LoRA.

minimind convert DIR --to llama --out OUT                      plain HF dir, no remote code (MoE: Qwen2-MoE)
minimind convert DIR --to gguf --out FILE.gguf [--dtype f32|f16|q8_0]
minimind convert FILE.pth --from minimind2 --tokenizer TOKDIR [--preset small|base|moe] --out OUT
minimind convert HF_DIR --from minimind2 --out OUT              the reference project's transformers format
minimind convert DIR --to minimind2 --out FILE.pth
minimind convert BASE --merge-lora ADAPTER --out OUT
"""

from __future__ import annotations

import argparse

from minimind.errors import UserError

TARGETS = ("llama", "gguf", "minimind2", "minimind2-pth")
SOURCES = ("minimind2", "minimind2-pth")
GGUF_DTYPES = ("f32", "f16", "q8_0")
IMPORT_FLAGS = ("tokenizer", "preset", "n_heads", "experts_per_tok")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="model directory (--to, --merge-lora); MiniMind2 .pth file or "
                        "transformers-format MiniMind directory (--from)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--to",
        choices=TARGETS,
        help="export: llama = plain HF directory (Qwen2-MoE for MoE models), gguf = llama.cpp "
        "file, minimind2 (= minimind2-pth) = MiniMind2 .pth state dict",
    )
    mode.add_argument(
        "--from",
        dest="from_format",
        choices=SOURCES,
        help="import a MiniMind2 .pth state dict or a transformers-format MiniMind directory (minimind2-pth "
        "is an alias)",
    )
    mode.add_argument(
        "--merge-lora",
        metavar="ADAPTER",
        help="PEFT adapter directory to merge into the base model directory SOURCE",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (llama, --from, --merge-lora; must be new or empty) or file (.gguf, .pth)",
    )
    parser.add_argument(
        "--dtype",
        choices=GGUF_DTYPES,
        default=None,
        help="GGUF tensor type for matrices, --to gguf only (None = f16); norms stay f32",
    )
    parser.add_argument(
        "--tokenizer",
        metavar="TOKDIR",
        help="tokenizer directory to put beside imported weights (--from; required for a .pth, default the "
        "source directory)",
    )
    parser.add_argument(
        "--preset",
        choices=("small", "base", "moe"),
        default=None,
        help="--from: MiniMind2 preset giving the head count (None = the preset whose width "
        "matches the checkpoint)",
    )
    parser.add_argument(
        "--n-heads",
        type=int,
        metavar="N",
        default=None,
        help="--from: attention heads, overriding the preset (shapes cannot tell)",
    )
    parser.add_argument(
        "--experts-per-tok",
        type=int,
        metavar="K",
        default=None,
        help="--from, MoE: routed experts per token (None = the preset's, 2)",
    )


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that the chosen mode would silently ignore."""
    if args.dtype is not None and args.to != "gguf":
        raise UserError("--dtype applies only to --to gguf")
    if args.from_format is None:  # (--from without --tokenizer is import_minimind2's to judge: a directory has one)
        for flag in IMPORT_FLAGS:
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')} applies only to --from minimind2")


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    if args.merge_lora is not None:
        from minimind.convert.lora_merge import merge_lora

        count = merge_lora(args.source, args.merge_lora, args.out)
        print(f"convert: merged LoRA into {count} modules -> {args.out}")
    elif args.from_format is not None:
        from minimind.convert.minimind2 import import_minimind2

        config = import_minimind2(
            args.source, args.tokenizer, args.out, args.preset, args.n_heads, args.experts_per_tok
        )
        kind = (
            f"MoE {config.n_routed_experts}+{config.n_shared_experts} experts" if config.use_moe else "dense"
        )
        print(
            f"convert: imported MiniMind2 weights (dim {config.dim}, {config.n_layers} layers, {kind}) "
            f"-> {args.out}"
        )
    elif args.to == "llama":
        from minimind.convert.llama import export_llama

        architecture = export_llama(args.source, args.out)
        print(f"convert: wrote a {architecture} directory (loads without trust_remote_code) -> {args.out}")
    elif args.to == "gguf":
        from minimind.convert.gguf import export_gguf

        dtype = args.dtype or "f16"
        export_gguf(args.source, args.out, dtype)
        print(f"convert: wrote GGUF ({dtype}, llama architecture) -> {args.out}")
    else:
        from minimind.convert.minimind2 import export_minimind2

        export_minimind2(args.source, args.out)
        print(f"convert: wrote a MiniMind2 .pth state dict -> {args.out}")
    return 0

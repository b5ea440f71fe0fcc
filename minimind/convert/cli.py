"""`minimind convert`: export a model directory to another format, import MiniMind2 / minimind-3 / Qwen3 weights,
merge LoRA.

minimind convert DIR --to llama --out OUT                      plain HF dir, no remote code (MoE: Qwen2-MoE)
minimind convert DIR --to qwen3 --out OUT                      QK-norm models: plain Qwen3 / Qwen3-MoE dir
minimind convert DIR --to gguf --out FILE.gguf [--dtype f32|f16|q8_0|q4_0]
minimind convert FILE.pth --from minimind2 --tokenizer TOKDIR [--preset small|base|moe] --out OUT
minimind convert HF_DIR --from minimind2 --out OUT              the reference project's transformers format
minimind convert DIR --to minimind2 --out FILE.pth
minimind convert HF_DIR --from minimind3 --out OUT              a released minimind-3 directory, dense or MoE
minimind convert FILE.pth --from minimind3 --tokenizer TOKDIR [--experts-per-tok K] --out OUT
minimind convert DIR --to minimind3 --out FILE.pth              the fp16 state dict minimind-3's scripts load
minimind convert HF_DIR --from qwen3 --out OUT                  Qwen3ForCausalLM / Qwen3MoeForCausalLM
minimind convert BASE --merge-lora ADAPTER --out OUT
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from minimind.errors import UserError
from minimind.hub import model_dir
from minimind.outputs import MODEL_DIR_FILES, model_code_files, refuse_products, writing_product

TARGETS = ("llama", "qwen3", "gguf", "minimind2", "minimind2-pth", "minimind3")
SOURCES = ("minimind2", "minimind2-pth", "minimind3", "qwen3")
GGUF_DTYPES = ("f32", "f16", "q8_0", "q4_0")
# import flag -> the --from formats it applies to
IMPORT_FLAGS = {
    "tokenizer": ("minimind2", "minimind3", "qwen3"),
    "preset": ("minimind2",),
    "n_heads": ("minimind2",),
    "experts_per_tok": ("minimind2", "minimind3"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=model_dir, help="model directory (--to, --merge-lora); .pth file or transformers "
                        "directory (--from)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--to",
        choices=TARGETS,
        help="export: llama = plain HF directory (Qwen2-MoE for MoE models), qwen3 = plain HF Qwen3 / "
        "Qwen3-MoE directory (QK-norm models), gguf = llama.cpp file, minimind2 (= minimind2-pth) = MiniMind2 .pth "
        "state dict, minimind3 = minimind-3 .pth state dict (fp16)",
    )
    mode.add_argument(
        "--from",
        dest="from_format",
        choices=SOURCES,
        help="import: minimind2 (= minimind2-pth) = a MiniMind2 .pth or transformers-format directory, "
        "minimind3 = a minimind-3 .pth or released transformers directory, qwen3 = a Qwen3 / Qwen3-MoE "
        "transformers directory",
    )
    mode.add_argument(
        "--merge-lora",
        metavar="ADAPTER",
        type=model_dir,
        help="PEFT adapter directory to merge into the base model directory SOURCE",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (llama, --from, --merge-lora; must be new or empty) or file (.gguf, .pth)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output at --out once the new one is complete (a failed conversion leaves it as "
        "it was): a file, a GGUF's Modelfile, or a directory holding a model and nothing else",
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
        type=model_dir,
        help="tokenizer directory to put beside imported weights (--from; required for a .pth, None = the "
        "source directory's)",
    )
    parser.add_argument(
        "--preset",
        choices=("small", "base", "moe"),
        default=None,
        help="--from minimind2: MiniMind2 preset giving the head count (None = the preset whose width "
        "matches the checkpoint)",
    )
    parser.add_argument(
        "--n-heads",
        type=int,
        metavar="N",
        default=None,
        help="--from minimind2: attention heads, overriding the preset (MiniMind2's shapes cannot tell)",
    )
    parser.add_argument(
        "--experts-per-tok",
        type=int,
        metavar="K",
        default=None,
        help="--from minimind2/minimind3, MoE: routed experts per token (None = config.json's, else the "
        "preset's 2 for minimind2 and 1 for minimind3)",
    )


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flags that the chosen mode would silently ignore."""
    if args.dtype is not None and args.to != "gguf":
        raise UserError("--dtype applies only to --to gguf")
    source = {"minimind2-pth": "minimind2"}.get(args.from_format, args.from_format)
    # (--from without --tokenizer is the importer's to judge: a directory has one)
    for flag, formats in IMPORT_FLAGS.items():
        if getattr(args, flag) is not None and source not in formats:
            names = " or ".join(filter(None, (", ".join(formats[:-1]), formats[-1])))
            raise UserError(f"--{flag.replace('_', '-')} applies only to --from {names}")


# the formats --to writes as one file (the others, and every import, write a model directory)
FILE_TARGETS = ("gguf", "minimind2", "minimind2-pth", "minimind3")


def _check_output(args: argparse.Namespace) -> bool:
    """An --out that already holds an export or a model directory is refused unless --overwrite, and so is a
    GGUF's folder whose Modelfile is another export's; a directory that holds other files too is refused
    either way. -> whether --out is a model directory to replace."""
    path = Path(args.out)
    if path.is_file() and not args.overwrite:
        raise UserError(f"--out {path}: already exists; choose another --out, or add --overwrite to replace it")
    modelfile = path.with_name("Modelfile")
    if args.to == "gguf" and modelfile.is_file() and not args.overwrite \
            and modelfile.read_text(encoding="utf-8", errors="replace").partition("\n")[0] != f"FROM ./{path.name}":
        raise UserError(f"--out {path}: {modelfile} is there for another GGUF; choose another folder, or add "
                        "--overwrite to replace it")
    if not path.is_dir():
        return False
    if args.to in FILE_TARGETS:
        raise UserError(f"--out {path}: is a directory; --to {args.to} writes one file: give its path")
    products = [*MODEL_DIR_FILES, *model_code_files()]
    found = refuse_products(path, products, "a model directory", args.overwrite)
    others = sorted(p.name for p in path.iterdir() if p.name not in products)
    if found and others:
        raise UserError(f"--out {path}: holds other files besides a model ({', '.join(others[:3])}); --overwrite "
                        "replaces a model directory only: move them, or choose another --out")
    return bool(found)


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    replace = _check_output(args)
    with writing_product(args.out, ()):  # each converter removes its own partial file or staging folder
        if not replace:
            return _convert(args)
        # the earlier model steps aside (one rename) and comes back if the conversion fails
        out = Path(args.out)
        earlier = out.with_name(f".{out.name}.earlier-{os.getpid()}")
        os.replace(out, earlier)
        try:
            code = _convert(args)
        except BaseException:
            if out.exists():  # (a converter leaves no partial output; this is a guard)
                shutil.rmtree(out)
            os.replace(earlier, out)
            raise
        shutil.rmtree(earlier)
        return code


def _convert(args: argparse.Namespace) -> int:
    if args.merge_lora is not None:
        from minimind.convert.lora_merge import merge_adapter_dir

        count = merge_adapter_dir(args.source, args.merge_lora, args.out)
        print(f"convert: merged LoRA into {count} modules -> {args.out}")
    elif args.from_format in ("minimind3", "qwen3"):
        from minimind.convert.minimind3 import import_minimind3, import_qwen3

        if args.from_format == "minimind3":
            config, name = import_minimind3(args.source, args.tokenizer, args.out, args.experts_per_tok), "minimind-3"
        else:
            config, name = import_qwen3(args.source, args.tokenizer, args.out), "Qwen3"
        print(f"convert: imported {name} weights ({describe(config)}) -> {args.out}")
    elif args.from_format is not None:
        from minimind.convert.minimind2 import import_minimind2

        config = import_minimind2(
            args.source, args.tokenizer, args.out, args.preset, args.n_heads, args.experts_per_tok
        )
        print(f"convert: imported MiniMind2 weights ({describe(config)}) -> {args.out}")
    elif args.to in ("llama", "qwen3"):
        from minimind.convert.llama import export_llama
        from minimind.convert.qwen3 import export_qwen3

        architecture = (export_llama if args.to == "llama" else export_qwen3)(args.source, args.out)
        print(f"convert: wrote a {architecture} directory (loads without trust_remote_code) -> {args.out}")
    elif args.to == "gguf":
        from minimind.convert.gguf import export_gguf, gguf_architecture
        from minimind.modeldir import adapter_source, load_config

        dtype = args.dtype or "f16"
        out = export_gguf(args.source, args.out, dtype)
        architecture = gguf_architecture(load_config(adapter_source(Path(args.source), ("config.json",))))
        print(f"convert: wrote GGUF ({dtype}, {architecture} architecture) -> {out}, and {out.parent / 'Modelfile'} "
              f"for `ollama create NAME -f {out.parent / 'Modelfile'}`")
    elif args.to == "minimind3":
        from minimind.convert.minimind3 import export_minimind3

        export_minimind3(args.source, args.out)
        print(f"convert: wrote a minimind-3 .pth state dict (fp16) -> {args.out}")
    else:
        from minimind.convert.minimind2 import export_minimind2

        export_minimind2(args.source, args.out)
        print(f"convert: wrote a MiniMind2 .pth state dict -> {args.out}")
    return 0


def describe(config) -> str:
    """'dim 768, 8 layers, dense' / '..., MoE 4+0 experts': what an import produced, for its one-line report."""
    kind = f"MoE {config.n_routed_experts}+{config.n_shared_experts} experts" if config.use_moe else "dense"
    return f"dim {config.dim}, {config.n_layers} layers, {kind}"

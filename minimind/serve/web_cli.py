"""`minimind web`: the Streamlit chat page over the model directories found under --models-dir.

    minimind web                                   # models under runs/, http://127.0.0.1:8501
    minimind web --models-dir runs --port 8600 --host 0.0.0.0
    minimind web --no-prefix-cache                 # every turn prefills its whole history again

Replaces itself with `streamlit run` on `minimind/serve/webui/page.py` (headless: open the printed address yourself).
A model directory is any folder holding config.json + model.safetensors, e.g. the output of any stage, or a LoRA
adapter (`minimind lora`'s output), which runs merged into its base model.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minimind.errors import UserError, install_hint
from minimind.infer.options import PREFIX_CACHE_TOKENS, add_engine_arguments, add_prefix_cache_arguments
from minimind.serve.serve_cli import tcp_port
from minimind.serve.webchat import find_models

PAGE = Path(__file__).with_name("webui") / "page.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", default="runs", help="folder searched (recursively) for model directories")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 = every interface)")
    parser.add_argument("--port", type=tcp_port, default=8501, help="TCP port")
    add_engine_arguments(parser)
    add_prefix_cache_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise UserError(f"minimind web needs streamlit: {install_hint('serve')}") from None
    models = find_models(args.models_dir)
    if not models:
        raise UserError(f"--models-dir {args.models_dir}: no model directory (config.json + model.safetensors) "
                        "found there; train one first or point --models-dir at one")
    page_args = ["--models-dir", str(Path(args.models_dir).resolve()), "--device", args.device]
    if args.dtype:
        page_args += ["--dtype", args.dtype]
    if args.quantize:
        page_args += ["--quantize", args.quantize]
    if args.compile is not None:  # unset: the page compiles by default, as the other verbs do
        page_args.append("--compile" if args.compile else "--no-compile")
    if args.no_prepack:
        page_args.append("--no-prepack")
    if args.prefix_cache_tokens != PREFIX_CACHE_TOKENS:
        page_args += ["--prefix-cache-tokens", str(args.prefix_cache_tokens)]
    command = [
        sys.executable, "-m", "streamlit", "run", str(PAGE),
        "--server.address", args.host, "--server.port", str(args.port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",
        "--", *page_args,
    ]
    # the page imports `minimind`: make this package importable even when it is not pip-installed
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    print(f"minimind web: {len(models)} model(s) under {args.models_dir}; http://{args.host}:{args.port}", flush=True)
    # become Streamlit (no child process): Ctrl-C and SIGTERM reach the server directly, nothing is orphaned
    os.execve(sys.executable, command, env)
    return 0  # not reached

"""Throughput of the API server: 16 concurrent streaming clients against the same 16 requests one by one.

    python bench/serve.py                          # preset small, random weights, 16 clients x 64 new tokens
    python bench/serve.py --clients 8 --new-tokens 32
    python bench/serve.py --model runs/sft --device cuda

Starts the real server (`python -m minimind serve`) on a free port, sends one warm-up request, then the same
`--clients` streaming chat requests (eos ignored, so each yields exactly --new-tokens tokens) first one after
another, then all at once. Every stream must end in `data: [DONE]` with usage matching --new-tokens.
Throughput = generated tokens / wall time (prefill included). Best of --repeats rounds per mode. The last
line is `serve: ratio=<concurrent/sequential> (ours <concurrent tok/s>, peer <sequential tok/s>)`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import add_bench_arguments, bench_parser  # noqa: E402
from decode import bench_tokenizer  # noqa: E402  (bench/decode.py: a throwaway tokenizer of any vocab size)

from minimind.model import MiniMindConfig, MiniMindForCausalLM  # noqa: E402
from minimind.modeldir import save_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def random_model_dir(preset: str, out: Path) -> Path:
    """A model directory with a preset's random weights and a tokenizer trained in seconds."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig.from_preset(preset)).eval()
    tokenizer, _ = bench_tokenizer(model.config.vocab_size)
    save_model_dir(model, tokenizer, out)
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model_dir: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [sys.executable, "-m", "minimind", "serve", "--model", str(model_dir), "--port", str(port),
               "--max-batch-size", str(max(args.clients, 1)), "--device", args.device, "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, env=env, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    sys.exit("the server did not become ready in 300 s")


def one_stream(url: str, index: int, new_tokens: int) -> int:
    """One streaming chat request; checks the stream's shape and returns its completion tokens."""
    body = {"messages": [{"role": "user", "content": f"Request {index}: tell me a story about the number {index}."}],
            "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0.8, "seed": index, "stream": True,
            "stream_options": {"include_usage": True}}
    payloads = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    if payloads[-1] != "[DONE]":
        raise RuntimeError(f"stream {index} did not end with [DONE]")
    tokens = json.loads(payloads[-2])["usage"]["completion_tokens"]
    if tokens != new_tokens:
        raise RuntimeError(f"stream {index} generated {tokens} tokens, expected {new_tokens}")
    return tokens


def sequential(url: str, clients: int, new_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = sum(one_stream(url, i, new_tokens) for i in range(clients))
    return tokens, time.perf_counter() - start


def concurrent(url: str, clients: int, new_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(lambda i: one_stream(url, i, new_tokens), range(clients)))
    return tokens, time.perf_counter() - start


def best_rate(run, url: str, args: argparse.Namespace) -> float:
    rates = []
    for _ in range(args.repeats):
        tokens, seconds = run(url, args.clients, args.new_tokens)
        rates.append(tokens / seconds)
        print(f"  {run.__name__}: {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.1f} tok/s", flush=True)
    return max(rates)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--preset", default="small", help="model preset with random weights (ignored with --model)")
    parser.add_argument("--model", default=None, help="benchmark a model directory instead of a preset")
    parser.add_argument("--clients", type=int, default=16, help="requests per round")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    add_bench_arguments(parser, repeats=(2, "rounds per mode (best is kept)"), device="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        model_dir = Path(args.model) if args.model else random_model_dir(args.preset, Path(scratch) / args.preset)
        ours, peer = measure(model_dir, args)
    print(f"sequential {peer:.1f} tok/s, concurrent {ours:.1f} tok/s")
    print(f"serve: ratio={ours / peer:.2f} (ours {ours:.1f}, peer {peer:.1f})")
    return 0


def measure(model_dir: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(concurrent, sequential) tokens/s against a server started on `model_dir`."""
    port = free_port()
    server = start_server(model_dir, port, args)
    url = f"http://127.0.0.1:{port}"
    try:
        one_stream(url, 0, args.new_tokens)  # warm-up
        print(f"model: {args.model or 'preset ' + args.preset}, {args.clients} streaming chat requests x "
              f"{args.new_tokens} new tokens, cpu threads {torch.get_num_threads()}", flush=True)
        peer = best_rate(sequential, url, args)
        ours = best_rate(concurrent, url, args)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return ours, peer


if __name__ == "__main__":
    sys.exit(main())

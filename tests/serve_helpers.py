"""Start a real `python -m minimind <verb>` server process on a free port and wait until it answers; fine-tune the
tiny models the serving tests talk to."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from minimind.cli import main

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_server(args: list[str], ready_url: str, timeout: float = 180.0) -> Iterator[subprocess.Popen]:
    """Run `python -m minimind *args`, poll `ready_url` until it answers 200, stop the process at the end."""
    log = tempfile.NamedTemporaryFile("w+", prefix="minimind-server-", suffix=".log", delete=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINIMIND_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minimind", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{Path(log.name).read_text()}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {timeout} s:\n{Path(log.name).read_text()}")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        os.unlink(log.name)


def sse_events(lines: Iterator[str]) -> Iterator[str]:
    """The payloads of `data: ...` lines of a server-sent event stream."""
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: "):]


def finetune(records: list[dict], init: Path, out: Path, steps: int, max_seq_len: int, lr: str = "3e-3") -> Path:
    """SFT the model directory `init` on `records` (each repeated 8 times) until it repeats them; -> `out`."""
    data = out.with_name(out.name + ".jsonl")
    data.write_text("".join(json.dumps(r) + "\n" for r in records * 8))
    assert main(["sft", "--data", str(data), "--init", str(init), "--out", str(out), "--max-steps", str(steps),
                 "--batch-size", "4", "--lr", lr, "--warmup-steps", "5", "--max-seq-len", str(max_seq_len),
                 "--device", "cpu", "--dtype", "fp32"]) == 0
    return out

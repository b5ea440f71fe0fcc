"""Running `minimind pretrain` under torchrun (and in-process) on a tiny model, for the distributed tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import spawn, stop
from safetensors.torch import load_file

from minimind.cli import main

# dropout 0: ranks draw different dropout masks, so only a dropout-free run can match another world size.
TINY = ["--preset", "tiny", "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=4", "--set", "n_kv_heads=2",
        "--set", "dropout=0"]
STEPS = 6


def pretrain_args(corpus: Path, tokenizer_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), *TINY,
            "--max-seq-len", "32", "--max-steps", str(STEPS), "--warmup-steps", "1", "--device", "cpu",
            "--dtype", "fp32", "--log-every", "1", *extra]


def start_torchrun(nproc: int, args: list[str]) -> subprocess.Popen:
    """`python -m torch.distributed.run --nproc_per_node N -m minimind ARGS` with this interpreter's torch,
    in a process group of its own (stopped with its workers at the test's teardown; stdout+stderr piped).

    `--standalone` makes torchrun host its own rendezvous on a free port, so parallel runs never collide.
    """
    # faulthandler: a worker sent SIGABRT prints every thread's Python stack (what `torchrun` does on a hang).
    env = {**os.environ, "MINIMIND_NO_PROGRESS": "1", "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "minimind", *args]
    return spawn(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                 start_new_session=True)


def torchrun(nproc: int, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `start_torchrun` to the end; past `timeout` seconds it and its workers are stopped and it fails."""
    proc = start_torchrun(nproc, args)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = _children(proc.pid)
        for pid in workers or [proc.pid]:  # each prints where it is stuck, then dies; torchrun then stops the rest
            os.kill(pid, signal.SIGABRT)
        time.sleep(3)
        stop(proc)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun ran past {timeout} s; its workers then: {workers or 'none (torchrun itself)'}"
                             f"\n{stdout[-3000:]}\n{stderr[-12000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state is the parent's pid
                found.append(int(entry.name))
    return found


def run_ok(nproc: int, args: list[str]) -> str:
    """Run under torchrun (nproc > 0) or in this process (nproc == 0); assert success, return the output."""
    if nproc == 0:
        assert main(args) == 0
        return ""
    result = torchrun(nproc, args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result.stdout + result.stderr


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, loss, grad_norm) per logged step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def max_loss_gap(a: Path, b: Path) -> float:
    """The largest per-step loss difference between two runs (which must log the same steps)."""
    la, lb = losses(a), losses(b)
    assert [s for s, _, _ in la] == [s for s, _, _ in lb] == list(range(1, STEPS + 1))
    return max(abs(x[1] - y[1]) for x, y in zip(la, lb))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def max_weight_gap(a: Path, b: Path) -> float:
    wa, wb = final_weights(a), final_weights(b)
    assert set(wa) == set(wb)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)

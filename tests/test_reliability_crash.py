"""Crash anywhere, lose nothing: SIGKILL at random moments and mid-checkpoint, SIGTERM/SIGINT, damaged checkpoints.

Every run is a real `python -m minimind pretrain` process (tiny model, fp32, CPU, dropout on, a checkpoint every
2 steps). The reference is one uninterrupted run; a run killed and resumed again and again must end with the
same weights, bit for bit, and the same per-step losses in metrics.jsonl (torchtitan's `loss_compare
--assert-equal`). A damaged latest checkpoint must be detected and the previous one used, with a warning.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import spawn
from safetensors.torch import load_file

from minimind.cli import main
from minimind.data.shards import Shard
from minimind.errors import UserError
from minimind.train.checkpoint import CheckpointDir

REPO = Path(__file__).resolve().parents[1]
STEPS = 24
TINY = ["--preset", "tiny", "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=4", "--set", "n_kv_heads=2",
        "--set", "dropout=0.1"]


def pretrain_args(corpus: Path, tokenizer_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), *TINY,
            "--max-seq-len", "32", "--batch-size", "4", "--max-steps", str(STEPS), "--warmup-steps", "2",
            "--device", "cpu", "--dtype", "fp32", "--save-every", "2", "--keep-checkpoints", "2", "--log-every", "1",
            *extra]


# `python -c PAUSING <point> <verb> ...`: the CLI, except that the process stops itself (SIGSTOP) the first time
# it reaches <point> of a write, so a kill lands there by construction rather than by a lucky poll:
#   staged    checkpoint files in .tmp-step-N, no manifest yet      manifest  manifest written, not renamed
#   renamed   step-N in place, `latest` not yet moved                final     model files staged in .save-*
#   rows      `prepare` has written 10 samples' tokens                meta      `prepare`'s meta.json staged, not renamed
PAUSING = """
import itertools, os, signal, sys
from minimind.data import shards
from minimind import modeldir as hub
from minimind.train import checkpoint

point = sys.argv.pop(1)
paused = False

def pause_at(here, then):
    def wrapped(*args, **kwargs):
        global paused
        if here(*args) and not paused:
            paused = True
            os.kill(os.getpid(), signal.SIGSTOP)
        return then(*args, **kwargs)
    return wrapped

if point == "staged":
    checkpoint.CheckpointDir.commit = pause_at(lambda *a: True, checkpoint.CheckpointDir.commit)
elif point == "manifest":
    checkpoint._fsync_dir = pause_at(lambda path: path.name.startswith(".tmp-step-"), checkpoint._fsync_dir)
elif point == "renamed":
    checkpoint._fsync_file = pause_at(lambda path: path.name == ".latest.tmp", checkpoint._fsync_file)
elif point == "final":
    hub._write_generation_config = pause_at(lambda *a: True, hub._write_generation_config)
elif point == "rows":
    calls = itertools.count(1)
    shards.ShardWriter.add_many = pause_at(lambda *a: next(calls) == 1, shards.ShardWriter.add_many)
elif point == "meta":
    os.replace = pause_at(lambda src, dst: os.path.basename(dst) == "meta.json", os.replace)
from minimind.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch(args: list[str], new_session: bool = False, pause: str | None = None) -> subprocess.Popen:
    """A `python -m minimind` process that dies with the test; with `pause`, one that stops itself there."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINIMIND_NO_PROGRESS": "1"}
    command = ["-c", PAUSING, pause] if pause else ["-m", "minimind"]
    return spawn([sys.executable, *command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                 env=env, start_new_session=new_session)


def wait_stopped(proc: subprocess.Popen) -> bool:
    """Block until the process stops itself (True) or exits (False); it stays waitable either way."""
    info = os.waitid(os.P_PID, proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
    return info.si_code == os.CLD_STOPPED


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert "Traceback" not in output, output
    return output


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-identical final weights and identical per-step losses and gradient norms."""
    assert losses(run) == losses(reference)
    a, b = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 180.0, poll: float = 0.01) -> bool:
    """Poll `condition` until it holds (True) or the process exits first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out waiting for the training process")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    """The uninterrupted run, as a process like every other run here."""
    out = tmp_path_factory.mktemp("reference")
    proc = launch(pretrain_args(corpus_file, tokenizer_dir, out))
    finish(proc)
    assert proc.returncode == 0 and (out / "model.safetensors").is_file()
    return out


@pytest.mark.slow
def test_sigkill_at_random_moments_and_mid_checkpoint_loses_nothing(tmp_path, corpus_file, tokenizer_dir,
                                                                     reference):
    """Kill points: during steps at random (seeded) times, at each stage of writing a checkpoint (files staged,
    manifest written, renamed before `latest` moves) and while the final model directory is being staged;
    resume after each; the result equals the uninterrupted run."""
    out = tmp_path / "killed"
    rng = random.Random(1234)
    plan = ["step", "staged", "step", "manifest", "step", "renamed", "final"]
    seen_while_stopped = {  # what the paused process must have left on disk at its pause point
        "staged": lambda c: any(not (p / "manifest.json").exists() for p in c.glob(".tmp-step-*")),
        "manifest": lambda c: any((p / "manifest.json").exists() for p in c.glob(".tmp-step-*")),
        "renamed": lambda c: (c / ".latest.tmp").exists(),
        "final": lambda c: any(out.glob(".save-*/model.safetensors")),
    }
    kills, resumed_from = [], []
    first = True
    for moment in plan:
        resume = [] if first else ["--resume"]
        first = False
        if moment == "step":  # a random step after this run's first, then a random fraction of a step
            proc = launch(pretrain_args(corpus_file, tokenizer_dir, out, *resume))
            start = logged_steps(out)
            target = rng.randint(start + 1, min(start + 5, STEPS - 1))
            hit = wait_until(lambda t=target: logged_steps(out) >= t, proc, poll=0.01)
            time.sleep(rng.uniform(0.0, 0.05))
        else:
            proc = launch(pretrain_args(corpus_file, tokenizer_dir, out, *resume), pause=moment)
            hit = wait_stopped(proc) and seen_while_stopped[moment](out / "checkpoints")
        assert hit, f"the run did not reach the {moment} kill point:\n{finish(proc)}"
        proc.send_signal(signal.SIGKILL)
        output = finish(proc)
        assert proc.returncode == -signal.SIGKILL
        kills.append((moment, logged_steps(out)))
        resumed_from += [line for line in output.splitlines() if line.startswith(("resumed from", "--resume: no"))]
    proc = launch(pretrain_args(corpus_file, tokenizer_dir, out, "--resume"))
    output = finish(proc)
    assert proc.returncode == 0, output
    assert "damaged" not in output  # a kill never leaves a committed checkpoint half-written
    print(f"kills (moment, last logged step): {kills}; resumes: {resumed_from}")
    assert_same_run(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_exits_zero_and_resumes_to_the_same_weights(tmp_path, corpus_file, tokenizer_dir,
                                                                       reference, sig):
    """SIGTERM (preemption) or SIGINT (Ctrl-C, sent to the whole process group as a terminal does, so the
    DataLoader workers get it too) mid-run: the step finishes, a checkpoint is written, exit 0 with how to
    resume; the resumed run equals the uninterrupted one."""
    out = tmp_path / "signalled"
    proc = launch(pretrain_args(corpus_file, tokenizer_dir, out, "--num-workers", "2"), new_session=True)
    assert wait_until(lambda: logged_steps(out) >= 3, proc), finish(proc)
    os.killpg(proc.pid, sig)
    output = finish(proc)
    assert proc.returncode == 0, output
    stopped = logged_steps(out)
    assert f"received {sig.name}: saved checkpoint at step {stopped}/{STEPS}" in output
    assert "continue with the same command plus --resume" in output
    assert stopped < STEPS and CheckpointDir(out).latest().name == f"step-{stopped}"
    proc = launch(pretrain_args(corpus_file, tokenizer_dir, out, "--num-workers", "2", "--resume"))
    output = finish(proc)
    assert proc.returncode == 0 and f"resumed from {out / 'checkpoints' / f'step-{stopped}'}" in output
    assert_same_run(out, reference)


@pytest.mark.parametrize("moment", ["rows", "meta"])
def test_prepare_killed_mid_way_leaves_nothing_usable(tmp_path, corpus_file, tokenizer_dir, moment):
    """docs/reliability.md: a `prepare` killed while writing samples, or with its meta.json staged but not yet
    renamed into place, leaves nothing a reader takes for a dataset (its files are in a staging folder, which the
    next run removes); running it again gives the whole one."""
    out = tmp_path / "prepared"
    args = ["prepare", "--data", str(corpus_file), "--tokenizer", str(tokenizer_dir), "--out", str(out),
            "--kind", "pretrain", "--workers", "0"]
    proc = launch(args, pause=moment)
    assert wait_stopped(proc), finish(proc)
    proc.send_signal(signal.SIGKILL)
    finish(proc)
    assert not (out / "tokens.bin").exists() and not (out / "meta.json").exists()
    assert [p.name for p in out.glob(".partial-*/tokens.bin")] == ["tokens.bin"]
    with pytest.raises(UserError, match="not a prepared dataset \\(meta.json is missing"):
        Shard(out)
    assert main(args) == 0  # nothing earlier to refuse
    assert not list(out.glob(".partial-*"))  # the killed run's staging folder is gone
    clean = tmp_path / "clean"
    assert main([arg if arg != str(out) else str(clean) for arg in args]) == 0
    assert (out / "tokens.bin").read_bytes() == (clean / "tokens.bin").read_bytes()
    assert Shard(out).meta["n_samples"] == Shard(clean).meta["n_samples"] > 10


# ---- damaged checkpoints: detected, the previous complete one used, with a warning ------------------------
def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (lambda c: (c / "step-6" / "model.safetensors").write_bytes(
        (c / "step-6" / "model.safetensors").read_bytes()[:1000]), "model.safetensors is truncated"),
    "flipped byte in weights": (lambda c: flip_byte(c / "step-6" / "model.safetensors", 5000),
                                "model.safetensors does not match its checksum"),
    "flipped byte in optimizer state": (lambda c: flip_byte(c / "step-6" / "optimizer.pt", 2000),
                                        "optimizer.pt does not match its checksum"),
    "flipped byte in trainer.json": (lambda c: flip_byte(c / "step-6" / "trainer.json", 10),
                                     "trainer.json does not match its checksum"),
    "flipped byte in manifest": (lambda c: flip_byte(c / "step-6" / "manifest.json", 0),
                                 "manifest is missing or unreadable"),
    "manifest deleted": (lambda c: (c / "step-6" / "manifest.json").unlink(), "manifest is missing"),
    "file deleted": (lambda c: (c / "step-6" / "rng-rank0.pt").unlink(), "rng-rank0.pt is missing"),
    "stray file added": (lambda c: (c / "step-6" / "extra.bin").write_bytes(b"x"), "extra.bin is not in its manifest"),
    "garbage latest pointer": (lambda c: (c / "latest").write_bytes(b"\xff\x00garbage"), "latest is damaged"),
    "latest names a missing step": (lambda c: (c / "latest").write_text("step-99\n"), "names step-99"),
    "latest points outside": (lambda c: (c / "latest").write_text("../../elsewhere\n"), "latest is damaged"),
}


@pytest.fixture(scope="module")
def stopped_at_6(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    """A run stopped cleanly after 6 of 8 steps with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    args = pretrain_args(corpus_file, tokenizer_dir, out, "--max-steps", "8", "--keep-checkpoints", "3",
                         "--stop-after-steps", "6")
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def straight_8(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(pretrain_args(corpus_file, tokenizer_dir, out, "--max-steps", "8")) == 0
    return out


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, corpus_file, tokenizer_dir, stopped_at_6,
                                                             straight_8, name):
    damage, message = DAMAGE[name]
    out = tmp_path / "run"
    shutil.copytree(stopped_at_6, out)
    damage(out / "checkpoints")
    with pytest.warns(UserWarning, match=message):
        found = CheckpointDir(out).latest()
    step = 6 if "latest" in name else 4  # a bad pointer alone: the newest complete checkpoint is still good
    assert found.name == f"step-{step}"
    with pytest.warns(UserWarning, match=message):
        assert main(pretrain_args(corpus_file, tokenizer_dir, out, "--max-steps", "8", "--resume")) == 0
    assert_same_run(out, straight_8)


@pytest.mark.slow
def test_damaged_checkpoint_on_the_command_line_is_a_warning_not_a_traceback(tmp_path, corpus_file,
                                                                               tokenizer_dir, stopped_at_6):
    out = tmp_path / "run"
    shutil.copytree(stopped_at_6, out)
    flip_byte(out / "checkpoints" / "step-6" / "model.safetensors", 5000)
    (out / "checkpoints" / "step-4" / "manifest.json").unlink()  # the one before is damaged too
    proc = launch(pretrain_args(corpus_file, tokenizer_dir, out, "--max-steps", "8", "--resume"))
    output = finish(proc)
    assert proc.returncode == 0, output
    assert "step-6 is damaged (model.safetensors does not match its checksum)" in output
    assert f"resumed from {out / 'checkpoints' / 'step-2'}" in output

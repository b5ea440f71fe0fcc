"""DDP under torchrun (2 CPU ranks, gloo): equal to one process with the same global batch, exact resume,
resume on a different world size, and one clean error line for bad data.

The torchrun runs start two fresh interpreters each (about 20-30 s on two cores), hence `slow`.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from dist_helpers import (
    STEPS,
    final_weights,
    losses,
    max_loss_gap,
    max_weight_gap,
    pretrain_args,
    run_ok,
    start_torchrun,
    torchrun,
)

from minimind.errors import UserError
from minimind.train.checkpoint import CheckpointDir

# fp32 on both sides; the only difference is the order of the gradient sum (all-reduce vs one batch), which
# moves the loss by ~5e-7 over these steps (measured), so 1e-5 leaves ample room and still catches any
# sample, normalisation or accumulation mistake (those move it by 1e-2 or more).
TOL = 1e-5
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus_file, tokenizer_dir):
    out = tmp_path_factory.mktemp("one") / "run"
    run_ok(0, pretrain_args(corpus_file, tokenizer_dir, out, "--batch-size", "4"))
    return out


@pytest.fixture(scope="module")
def ddp_two(tmp_path_factory, corpus_file, tokenizer_dir):
    out = tmp_path_factory.mktemp("ddp") / "run"
    log = run_ok(2, pretrain_args(corpus_file, tokenizer_dir, out, "--batch-size", "2"))
    return out, log


def test_two_ranks_equal_one_process_with_the_same_global_batch(one_process, ddp_two):
    out, log = ddp_two
    assert "global batch 4 (2 x 1 accumulation x 2 processes)" in log
    assert max_loss_gap(one_process, out) < TOL
    grad_gaps = [abs(a[2] - b[2]) for a, b in zip(losses(one_process), losses(out))]
    assert max(grad_gaps) < 1e-4
    assert max_weight_gap(one_process, out) < 1e-4  # Adam divides tiny gradient noise by tiny moments
    assert losses(out)[-1][1] < losses(out)[0][1]
    assert (out / "checkpoints" / "step-6" / "rng-rank1.pt").is_file()  # every rank saved its RNG state


def test_ddp_resume_equals_uninterrupted_and_continues_on_one_process(tmp_path, corpus_file, tokenizer_dir,
                                                                      ddp_two):
    straight, _ = ddp_two
    halves = tmp_path / "halves"
    run_ok(2, pretrain_args(corpus_file, tokenizer_dir, halves, "--batch-size", "2", "--stop-after-steps", "3"))
    assert [s for s, _, _ in losses(halves)] == [1, 2, 3]
    moved = tmp_path / "moved"
    shutil.copytree(halves, moved)

    run_ok(2, pretrain_args(corpus_file, tokenizer_dir, halves, "--batch-size", "2", "--resume"))
    assert losses(halves) == losses(straight)  # bit-exact, step by step
    a, b = final_weights(straight), final_weights(halves)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The 2-rank checkpoint resumed by one process with the same global batch (batch doubled).
    run_ok(0, pretrain_args(corpus_file, tokenizer_dir, moved, "--batch-size", "4", "--resume"))
    assert losses(moved)[:3] == losses(straight)[:3]
    assert max_loss_gap(straight, moved) < TOL
    assert len(losses(moved)) == STEPS


def test_bad_data_is_one_error_line_from_rank_zero_and_no_hang(tmp_path, tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"conversations": []}\n')
    result = torchrun(2, pretrain_args(bad, tokenizer_dir, tmp_path / "out"), timeout=180)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("minimind pretrain: error:")]
    assert ours == [f'minimind pretrain: error: {bad}:2: missing field "text"'], result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert "exitcode  : 2" in result.stderr  # both ranks left with the CLI's user-error code


def test_sigterm_to_torchrun_reaches_every_rank_which_checkpoint_and_exit_zero(tmp_path, corpus_file,
                                                                              tokenizer_dir):
    """docs/distributed.md, preemption: SIGTERM to torchrun alone (as a scheduler sends it) is forwarded to both
    workers; they finish the step, write one checkpoint together (rank 1's files in it) and exit 0."""
    out = tmp_path / "preempted"
    proc = start_torchrun(2, pretrain_args(corpus_file, tokenizer_dir, out, "--batch-size", "2",
                                           "--max-steps", "100000"))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while (metrics.read_text().count('"loss"') if metrics.exists() else 0) < 2:  # mid-run: steps are logged
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    output = stdout + stderr
    latest = CheckpointDir(out).latest()  # complete: every file in its manifest, checksums verified
    assert latest is not None, output[-3000:]
    step = int(latest.name.removeprefix("step-"))
    assert f"received SIGTERM: saved checkpoint at step {step}" in output, output[-3000:]
    assert (latest / "rng-rank1.pt").is_file()  # rank 1 got the signal too and wrote its part
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output
    assert "exitcode" not in output, output[-3000:]  # torchrun reports a worker that failed or was killed


def test_a_rank_stuck_leaving_the_group_exits_with_its_code_after_the_timeout():
    """`cleanup`'s guard: a `destroy_process_group` that never returns ends the process with the exit code the
    run had, one line on stderr, after `LEAVE_TIMEOUT_S`; one that returns leaves the process running on."""
    program = (
        "import sys, time\n"
        "from minimind.train.distributed import leave_within\n"
        "leave_within(lambda: None, 0.5, 7, 'rank 0')\n"
        "time.sleep(1.0)\n"  # the first guard was cancelled: it must not end the process now
        "print('still here', flush=True)\n"
        "leave_within(lambda: time.sleep(600), 0.5, int(sys.argv[1]), 'rank 1')\n"
        "print('never printed')\n"
    )
    for code in (0, 2):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-c", program, str(code)], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == code, result.stderr
        assert result.stdout == "still here\n"
        assert result.stderr.splitlines()[-1] == ("minimind: rank 1: leaving the process group took over 0.5 s; "
                                                  "exiting without it")
        assert time.monotonic() - started < 60


@pytest.mark.parametrize("raised, code", [(KeyboardInterrupt, 130), (UserError, 2), (RuntimeError, 1)])
def test_run_stage_leaves_the_group_with_the_code_the_run_ends_with(tmp_path, monkeypatch, raised, code):
    """The code `cleanup`'s guard exits with, should leaving hang: 130 after Ctrl-C, as the CLI returns it."""
    import minimind.train.stages as stages
    from minimind.train.args import TrainConfig

    seen = []
    monkeypatch.setattr(stages, "cleanup", lambda info, exit_code: seen.append(exit_code))

    def build(cfg, info):
        raise raised("stopped")

    with pytest.raises(raised):
        stages.run_stage(TrainConfig(stage="test", data="-", out=str(tmp_path / "run"), device="cpu"), build)
    assert seen == [code]

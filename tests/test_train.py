"""The trainer: exact resume, accumulation equivalence, packing efficiency, NaN guard, checkpoints, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import spawn, tiny_model
from safetensors.torch import load_file

from minimind.cli import main
from minimind.data.datasets import stack_collate
from minimind.errors import UserError
from minimind.train.args import TrainConfig
from minimind.train.checkpoint import CheckpointDir
from minimind.train.distributed import DistInfo
from minimind.train.objective import LossOutput, MaskedLM
from minimind.train.schedule import lr_at
from minimind.train.trainer import StageRun, Trainer

TINY = ["--preset", "tiny", "--set", "dim=64", "--set", "n_layers=2", "--set", "n_heads=4", "--set", "n_kv_heads=2",
        "--set", "dropout=0.1"]  # dropout on: resume must restore the RNG too


def pretrain_args(corpus, tokenizer_dir, out, *extra):
    return ["pretrain", "--data", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out), *TINY,
            "--max-seq-len", "32", "--batch-size", "4", "--max-steps", "8", "--warmup-steps", "2",
            "--device", "cpu", "--dtype", "fp32", "--log-every", "1", *extra]


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus_file, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("pretrained")
    assert main(pretrain_args(corpus_file, tokenizer_dir, out)) == 0
    return out


def test_pretrain_writes_model_dir_metrics_and_report(pretrained):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "report.md", "loss.png", "metrics.jsonl"):
        assert (pretrained / name).is_file(), name
    rows = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert key in rows[0]
    assert all(r["nonpad_fraction"] >= 0.99 for r in rows)  # packed: no compute on padding
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (pretrained / "checkpoints" / "latest").read_text().strip() == "step-8"


def test_pretrain_resume_is_bit_exact(tmp_path, corpus_file, tokenizer_dir, pretrained):
    out = tmp_path / "halves"
    assert main(pretrain_args(corpus_file, tokenizer_dir, out, "--stop-after-steps", "4")) == 0
    assert len(losses(out)) == 4 and not (out / "model.safetensors").exists()
    assert main(pretrain_args(corpus_file, tokenizer_dir, out, "--resume")) == 0
    assert losses(out) == losses(pretrained)
    straight, resumed = weights(pretrained), weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_pretrain_init_continues_the_given_model(tmp_path, corpus_file, pretrained, capsys):
    common = ["pretrain", "--data", str(corpus_file), "--init", str(pretrained), "--max-seq-len", "32",
              "--batch-size", "4", "--max-steps", "3", "--warmup-steps", "0", "--device", "cpu", "--dtype", "fp32",
              "--log-every", "1"]
    # At learning rate 0 the weights stay those of --init: they were loaded, not drawn afresh.
    assert main([*common, "--out", str(tmp_path / "still"), "--lr", "0"]) == 0
    before, still = weights(pretrained), weights(tmp_path / "still")
    assert all(torch.equal(before[k], still[k]) for k in before)
    # Training on from there starts below a fresh model's first loss, and moves the weights.
    assert main([*common, "--out", str(tmp_path / "more")]) == 0
    assert losses(tmp_path / "more")[0][1] < losses(pretrained)[0][1] - 0.3
    assert not all(torch.equal(before[k], v) for k, v in weights(tmp_path / "more").items())
    assert json.loads((tmp_path / "more" / "config.json").read_text())["dim"] == 64  # --init's own shape
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "both"), "--preset", "tiny"]) == 2
    assert "--init continues a model with its own tokenizer and shape" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(corpus_file), "--out", str(tmp_path / "none")]) == 2
    assert "give --tokenizer DIR (a new model) or --init DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_sft_resume_is_bit_exact_with_dropout_and_workers(tmp_path, pretrained):
    data = tmp_path / "sft.jsonl"
    with open(data, "w") as handle:
        for i in range(120):
            chat = [{"role": "user", "content": f"What is {i} plus 1?"},
                    {"role": "assistant", "content": f"{i} plus 1 is {i + 1}."}]
            handle.write(json.dumps({"conversations": chat}) + "\n")
    common = ["sft", "--data", str(data), "--init", str(pretrained), "--max-seq-len", "128", "--batch-size", "2",
              "--max-steps", "6", "--warmup-steps", "1", "--device", "cpu", "--dtype", "fp32", "--num-workers", "2"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--stop-after-steps", "3"]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--resume"]) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accumulation_matches_one_big_batch(tmp_path, corpus_file, tokenizer_dir):
    big, small = tmp_path / "big", tmp_path / "small"
    no_dropout = ["--set", "dropout=0", "--max-steps", "3"]
    assert main(pretrain_args(corpus_file, tokenizer_dir, big, *no_dropout, "--batch-size", "4")) == 0
    assert main(pretrain_args(corpus_file, tokenizer_dir, small, *no_dropout, "--batch-size", "2",
                              "--accumulation-steps", "2")) == 0
    for (s1, l1, g1), (s2, l2, g2) in zip(losses(big), losses(small)):
        assert s1 == s2 and abs(l1 - l2) < 1e-5 and abs(g1 - g2) < 1e-4


def test_schedule_warmup_then_cosine_to_a_tenth():
    assert lr_at(0, 100, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_at(9, 100, 1e-3, 10) == pytest.approx(1e-3)
    assert lr_at(55, 100, 1e-3, 10) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(100, 100, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_at(0, 10, 1e-3) == pytest.approx(1e-3)


class NaNAfter(MaskedLM):
    """A real loss that turns NaN from a given step on (to exercise the guard)."""

    def __init__(self, bad_from: int):
        self.calls, self.bad_from = 0, bad_from

    def __call__(self, model, batch) -> LossOutput:
        self.calls += 1
        out = super().__call__(model, batch)
        if self.calls > self.bad_from:
            out.loss_sum = out.loss_sum * float("nan")
        return out


def synthetic_run(objective, n_rows=64, seq=16) -> StageRun:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 512, (n_rows, seq + 1), generator=g)
    data = [{"input_ids": r[:-1], "labels": r[1:], "loss_mask": torch.ones(seq)} for r in rows]
    return StageRun(model=tiny_model().train(), objective=objective, dataset=data, collate=stack_collate,
                    save_final=lambda m, out: None)


def test_nan_steps_are_skipped_then_training_stops_with_a_checkpoint(tmp_path):
    cfg = TrainConfig(stage="test", data="-", out=str(tmp_path), max_steps=20, batch_size=4, lr=1e-3,
                      device="cpu", dtype="fp32", nan_tolerance=3, seed=0, log_every=1)  # skipped steps shown too
    run = synthetic_run(NaNAfter(bad_from=5))
    trainer = Trainer(cfg, run, DistInfo())
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    with pytest.raises(UserError, match="non-finite loss nan for 3 steps in a row"):
        trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False] * 5 + [True] * 2
    assert CheckpointDir(tmp_path).latest().name == "step-8"
    after = load_file(str(tmp_path / "checkpoints" / "step-8" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the 5 good steps did update


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, corpus_file, tokenizer_dir):
    out = tmp_path / "run"
    assert main(pretrain_args(corpus_file, tokenizer_dir, out, "--save-every", "2", "--keep-checkpoints", "3",
                              "--stop-after-steps", "6")) == 0
    latest = out / "checkpoints" / "step-6" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated by a crash mid-copy
    with pytest.warns(UserWarning, match="step-6 is damaged .*model.safetensors is truncated"):
        assert CheckpointDir(out).latest().name == "step-4"
    with pytest.warns(UserWarning):
        assert main(pretrain_args(corpus_file, tokenizer_dir, out, "--resume")) == 0
    assert [s for s, _, _ in losses(out)] == list(range(1, 9))


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path, corpus_file, tokenizer_dir):
    out = tmp_path / "term"
    args = pretrain_args(corpus_file, tokenizer_dir, out, "--max-steps", "100000")
    env = {**os.environ, "MINIMIND_NO_PROGRESS": "1"}
    proc = spawn([sys.executable, "-m", "minimind", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                 text=True, env=env)  # stopped at teardown whatever happens here
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    # mid-run: two steps logged (the state, not a duration, says the loop is running)
    while proc.poll() is None and (metrics.read_text().count('"loss"') if metrics.exists() else 0) < 2:
        assert time.monotonic() < deadline, "the trainer logged no steps"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "received SIGTERM" in output and "--resume" in output
    assert CheckpointDir(out).latest() is not None


def test_bad_inputs_are_one_line_errors(tmp_path, tokenizer_dir):
    missing = subprocess.run([sys.executable, "-m", "minimind", *pretrain_args(tmp_path / "nope.jsonl",
                              tokenizer_dir, tmp_path / "x")], capture_output=True, text=True)
    assert missing.returncode == 2 and "nope.jsonl: no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"conversations": []}\n')
    result = subprocess.run([sys.executable, "-m", "minimind", *pretrain_args(bad, tokenizer_dir, tmp_path / "y")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and 'bad.jsonl:2: missing field "text"' in result.stderr


def test_a_missing_data_source_fails_before_the_stage_loads_torch(tmp_path):
    """A training verb checks the data paths on its command line before importing its stage (torch, transformers:
    seconds), so a mistyped path is one line at once; --help is not held up by it."""
    real = tmp_path / "real.jsonl"
    real.write_text('{"text": "x"}\n')
    script = ("import sys; from minimind.cli import main; code = main(sys.argv[1:]); "
              "print(code, 'torch' in sys.modules)")

    def run(*argv):
        return subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True)

    for argv, named in ((["grpo", f"--data={tmp_path}/nope.jsonl", "--init", "m", "--out", "o"], "nope.jsonl"),
                        (["sft", "--data", str(real), "--eval-data", str(tmp_path / "gone.jsonl"), "--init", "m",
                          "--out", "o"], "gone.jsonl")):
        result = run(*argv)
        assert result.stdout.split() == ["2", "False"], result.stderr
        assert result.stderr.strip().splitlines() == [
            f"minimind {argv[0]}: error: {tmp_path / named}: no such file or prepared directory"]
    assert run("grpo", "--data", str(tmp_path / "nope.jsonl"), "--help").returncode == 0


def test_mfu_counts_the_flops_a_batch_needs():
    """Full rows with every position in the loss: tokens x flops_per_token. Packed SFT rows: the head only at
    loss positions and attention per document, so skipping that work never shows as MFU above 100%."""
    from minimind.info import count_parameters, flops_per_token, training_flops
    from minimind.model.configuration_minimind import MiniMindConfig
    from minimind.train.objective import flop_counts

    config = MiniMindConfig.from_preset("small")
    assert training_flops(config, 4 * 512, 4 * 512, 4 * 512**2) == pytest.approx(4 * 512 * flops_per_token(config, 512))
    docs = torch.tensor([[0] * 3 + [1] * 5 + [-1] * 2, [0] * 10])
    loss_mask = torch.tensor([[0] * 2 + [1] * 6 + [0] * 2, [1] * 10])
    assert flop_counts({"input_ids": torch.zeros(2, 10), "doc_ids": docs, "loss_mask": loss_mask}) == (
        20, 16, 3**2 + 5**2 + 10**2)
    assert flop_counts({"input_ids": torch.zeros(2, 10)}) == (20, 20, 2 * 10**2)
    head_only = training_flops(config, 0, 1, 0)
    assert head_only == 3 * 2 * config.vocab_size * config.dim
    body_only = training_flops(config, 1, 0, 0)
    assert body_only + head_only == 3 * 2 * count_parameters(config).matmul_active


def test_mfu_counts_frozen_models_and_sampling(tmp_path):
    """A DPO reference's or a teacher's forward and RL sampling are FLOPs the step ran: the logged mfu counts them."""
    from minimind.info import forward_flops, sampling_flops, training_flops
    from minimind.train.objective import flop_counts
    from minimind.train.rewards import ModelReward, RuleReward
    from minimind.train.rollout import Rollout
    from minimind.train.stages.distill import Distill
    from minimind.train.stages.dpo import DPO
    from minimind.train.stages.grpo import GRPO

    config = tiny_model().config
    assert training_flops(config, 7, 5, 40) == 3 * forward_flops(config, 7, 5, 40)
    # Sampling 4 tokens after a 3-token prompt, 2 rows: the prefill (head at its last position), then 3 steps of
    # one token per row at contexts 4, 5 and 6.
    assert sampling_flops(config, 2, 3, 4) == forward_flops(config, 6, 2, 2 * 9) + forward_flops(config, 6, 6, 2 * 15)

    reference = tiny_model(1, n_layers=3)  # another shape, so its FLOPs are not the policy's
    rows = torch.randint(3, 512, (4, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:], "loss_mask": (torch.arange(8) >= 3).float().repeat(4, 1)}
    counts = flop_counts(batch)
    cfg = TrainConfig(stage="test", data="-", out=str(tmp_path), max_steps=1, batch_size=4, device="cpu", dtype="fp32")
    for objective, frozen in [(MaskedLM(), 0.0), (DPO(reference), forward_flops(reference.config, *counts)),
                              (Distill(reference), forward_flops(reference.config, *counts)), (Distill(None), 0.0)]:
        trainer = Trainer(cfg, synthetic_run(objective), DistInfo())
        trainer.total_steps = 1  # what fit() sets before the first step
        metrics = trainer.train_step([batch])
        assert metrics["flops"] == pytest.approx(training_flops(config, *counts) + frozen), type(objective).__name__

    rollout = Rollout(sequences=torch.zeros(6, 10, dtype=torch.long), attention_mask=torch.ones(6, 10),
                      completion_mask=torch.ones(6, 4), logprobs=torch.zeros(6, 4), finished=torch.ones(6, dtype=torch.bool),
                      prompt_len=6)
    rl = GRPO(reference, tokenizer=None, reward=None).rollout_counts(tiny_model(), rollout)
    counts = (60, 24, 6 * 10**2)
    rl_flops = training_flops(config, *counts) + forward_flops(reference.config, *counts) + sampling_flops(config, 6, 6, 4)
    assert rl["tokens"] == 60 and rl["flops"] == pytest.approx(rl_flops)
    # A scoring model's forward (`--reward model:DIR`) is counted too; a rule reward costs nothing.
    scorer = ModelReward.__new__(ModelReward)
    scorer.model = tiny_model(2, n_layers=1)
    rl = GRPO(reference, tokenizer=None, reward=scorer).rollout_counts(tiny_model(), rollout)
    assert rl["flops"] == pytest.approx(rl_flops + forward_flops(scorer.model.config, *counts))
    rl = GRPO(reference, tokenizer=None, reward=RuleReward(4)).rollout_counts(tiny_model(), rollout)
    assert rl["flops"] == pytest.approx(rl_flops)

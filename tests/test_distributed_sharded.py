"""`--strategy fsdp` (FSDP2) and `--strategy zero2` (DeepSpeed ZeRO-2) train on CPU with gloo like ddp does,
and their checkpoints resume on a different number of processes (and under another strategy).

Reference: one process, plain training, the same global batch — equal to 2-rank ddp within 1e-5
(test_distributed.py). All runs are fp32 with dropout 0, so the engines compute the same arithmetic and differ
only in the order of the gradient reduction (all-reduce vs reduce-scatter over flat buffers): measured loss
gaps are below 1e-6 over these steps, and TOL = 1e-5 still catches any real mistake (a wrong gradient
average, a lost accumulation micro-batch or a misplaced optimizer slice moves the loss by 1e-3 or more).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from conftest import tiny_model
from dist_helpers import losses, max_loss_gap, max_weight_gap, pretrain_args, run_ok
from safetensors.torch import load_file

from minimind.cli import main
from minimind.modeldir import load_model
from minimind.train.checkpoint import load_object
from minimind.train.strategies.fsdp import materialize, meta_copy, transformer_blocks

TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_file, tokenizer_dir):
    out = tmp_path_factory.mktemp("reference") / "run"
    run_ok(0, pretrain_args(corpus_file, tokenizer_dir, out, "--batch-size", "4"))
    return out


def saved_optimizer(run_dir):
    return load_object(run_dir / "checkpoints" / "step-6" / "optimizer.pt")


@pytest.mark.slow
def test_fsdp_trains_like_ddp_and_resumes_on_one_process(tmp_path, corpus_file, tokenizer_dir, reference):
    out = tmp_path / "fsdp"
    log = run_ok(2, pretrain_args(corpus_file, tokenizer_dir, out, "--strategy", "fsdp", "--batch-size", "2",
                                  "--stop-after-steps", "3"))
    assert "global batch 4 (2 x 1 accumulation x 2 processes)" in log
    # Saved on 2 ranks, resumed on 1 (FSDP on a one-process group), same global batch.
    run_ok(0, pretrain_args(corpus_file, tokenizer_dir, out, "--strategy", "fsdp", "--batch-size", "4",
                            "--resume"))
    assert max_loss_gap(reference, out) < TOL
    assert losses(out)[-1][1] < losses(out)[0][1]
    # The product is an ordinary model directory with the full (gathered) weights and the head still tied.
    assert max_weight_gap(reference, out) < 1e-4
    model = load_model(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # The checkpoint has the full AdamW state by parameter name, as ddp writes it.
    names = set(saved_optimizer(reference)["state"])
    assert set(saved_optimizer(out)["state"]) == names and "model.embed_tokens.weight" in names


@pytest.mark.slow
def test_fsdp_checkpoint_of_one_process_resumes_on_two(tmp_path, corpus_file, tokenizer_dir, reference):
    out = tmp_path / "fsdp-1-then-2"
    run_ok(0, pretrain_args(corpus_file, tokenizer_dir, out, "--strategy", "fsdp", "--batch-size", "4",
                            "--stop-after-steps", "3"))
    log = run_ok(2, pretrain_args(corpus_file, tokenizer_dir, out, "--strategy", "fsdp", "--batch-size", "2",
                                  "--resume"))
    assert "now 2 with fsdp" in log and "global batch 4 (2 x 1 accumulation x 2 processes)" in log
    assert max_loss_gap(reference, out) < TOL
    assert max_weight_gap(reference, out) < 1e-4


@pytest.mark.slow
def test_zero2_trains_like_ddp_and_its_checkpoint_resumes_anywhere(tmp_path, corpus_file, tokenizer_dir,
                                                                   reference):
    out = tmp_path / "zero2"
    # batch 1 x 2 accumulation x 2 ranks: DeepSpeed's engine accumulates, the Trainer's loop ends each step.
    run_ok(2, pretrain_args(corpus_file, tokenizer_dir, out, "--strategy", "zero2", "--batch-size", "1",
                            "--accumulation-steps", "2", "--stop-after-steps", "3"))
    under_ddp = tmp_path / "zero2-then-ddp"
    shutil.copytree(out, under_ddp)
    # Each rank held half of every AdamW moment; one process must get all of it back, in the right places.
    run_ok(0, pretrain_args(corpus_file, tokenizer_dir, out, "--strategy", "zero2", "--batch-size", "4",
                            "--resume"))
    assert max_loss_gap(reference, out) < TOL
    assert losses(out)[-1][1] < losses(out)[0][1]
    assert max_weight_gap(reference, out) < 1e-4
    ref_state, state = saved_optimizer(reference)["state"], saved_optimizer(out)["state"]
    assert set(state) == set(ref_state)
    for name in ref_state:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[name][key], ref_state[name][key], atol=1e-6, rtol=1e-4)
    # The same checkpoint format: a zero2 checkpoint continues under plain training.
    run_ok(0, pretrain_args(corpus_file, tokenizer_dir, under_ddp, "--batch-size", "4", "--resume"))
    assert max_loss_gap(reference, under_ddp) < TOL


def test_zero2_with_cpu_offload_matches_plain_training(tmp_path, corpus_file, tokenizer_dir, reference):
    out = tmp_path / "offload"
    run_ok(0, pretrain_args(corpus_file, tokenizer_dir, out, "--strategy", "zero2", "--zero-offload",
                            "--batch-size", "4"))
    assert max_loss_gap(reference, out) < TOL
    assert max_weight_gap(reference, out) < 1e-4
    # DeepSpeed needs LOCAL_RANK while it initialises; it must not stay behind for this process's children
    # (accelerate, e.g. inside lm-eval, would take them for distributed workers).
    assert "LOCAL_RANK" not in os.environ


def test_zero_offload_without_zero2_and_missing_deepspeed_are_clear_errors(tmp_path, corpus_file, tokenizer_dir,
                                                                           monkeypatch, capsys):
    args = pretrain_args(corpus_file, tokenizer_dir, tmp_path / "x", "--batch-size", "4", "--max-steps", "1")
    assert main([*args, "--zero-offload"]) == 2
    assert "error: --zero-offload needs --strategy zero2" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if it were not installed
    assert main([*args, "--strategy", "zero2"]) == 2
    assert ("error: --strategy zero2 needs DeepSpeed: pip install 'minimind-llm[deepspeed]' (from a clone: "
            "pip install -e '.[deepspeed]')") in capsys.readouterr().err


def test_fsdp_units_and_gathered_copy_keep_the_tied_head():
    model = tiny_model(seed=3)
    assert len(transformer_blocks(model)) == 2
    skeleton = meta_copy(model)
    assert skeleton.lm_head.weight.is_meta and skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    full = {k: v.clone() for k, v in model.state_dict().items()}
    rebuilt = materialize(skeleton, full)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    ids = torch.randint(0, 512, (2, 8))
    torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero2"])
def test_sharded_engines_skip_non_finite_steps_like_ddp(tmp_path, strategy):
    from test_train import NaNAfter, synthetic_run

    from minimind.train.args import TrainConfig
    from minimind.train.distributed import SharedError, init_distributed
    from minimind.train.trainer import Trainer

    cfg = TrainConfig(stage="test", data="-", out=str(tmp_path), max_steps=20, batch_size=4, lr=1e-3,
                      device="cpu", dtype="fp32", nan_tolerance=3, seed=0, strategy=strategy)
    info = init_distributed("cpu", need_group=True)  # a one-process group, as run_stage makes it
    with pytest.raises(SharedError, match="non-finite loss nan for 3 steps in a row"):
        Trainer(cfg, synthetic_run(NaNAfter(bad_from=5)), info).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows] == [False] * 5 + [True] * 2
    weights = load_file(str(tmp_path / "checkpoints" / "step-8" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())

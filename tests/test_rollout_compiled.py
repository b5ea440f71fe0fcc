"""Rollouts through the compiled batched decode step (`sample(compile=True)` -> `Engine(compile_batched=True)`,
infer/batched.py): the same tokens and log-probs as eager decoding, rows leaving at eos without a second
compilation, weights updated in place by a fused optimizer step reaching the next rollout, and the flag that
turns it on for the RL stages (MINIMIND_COMPILE=0 keeps it off)."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import tiny_model
from test_rollout_engine import NO_EOS, batch, full_forward_logprobs

from minimind.kernels.training import TrainingLM
from minimind.train.rollout import RLObjective, policy_engine, sample

pytestmark = pytest.mark.slow  # one compilation (a few seconds to a minute on 2 cores), shared by the tests below


@pytest.fixture(scope="module")
def policy() -> torch.nn.Module:
    return tiny_model(21).train()


def test_compiled_rollouts_sample_what_eager_ones_do_and_rows_leave_at_eos(policy):
    ids, mask = batch(group=2)  # 8 rows of 4 prompt lengths
    eager = sample(policy, ids, mask, 8, eos_id=NO_EOS, seed=5)
    compiled = sample(policy, ids, mask, 8, eos_id=NO_EOS, seed=5, compile=True)
    step = policy_engine(policy, NO_EOS, compile=True)._batched_step
    assert step is not None and step.compiled_calls == 7  # every step after the prefill's token, 8 rows each
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(compiled.logprobs, eager.logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(compiled.logprobs, full_forward_logprobs(policy, compiled) * compiled.completion_mask,
                               rtol=0, atol=1e-5)
    # A token some row samples midway becomes eos: rows then leave at different steps, and the batch shrinks.
    row = eager.completion_ids[1].tolist()
    eos = row[next(i for i in range(2, 8) if row[i] not in row[:i])]
    stopped = sample(policy, ids, mask, 8, eos_id=eos, seed=5, compile=True)
    plain = sample(policy, ids, mask, 8, eos_id=eos, seed=5)
    assert stopped.finished.any() and len(set(stopped.lengths().tolist())) > 1
    assert torch.equal(stopped.sequences, plain.sequences)
    torch.testing.assert_close(stopped.logprobs, plain.logprobs, rtol=0, atol=1e-5)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    sample(policy, ids[:5], mask[:5], 8, eos_id=eos, seed=6, compile=True)  # other rows, lengths and cache size
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompilation


def test_a_compiled_rollout_after_a_fused_optimizer_step_uses_the_new_weights(policy):
    view = TrainingLM(policy)
    ids, mask = batch()
    before = sample(view, ids, mask, 6, eos_id=NO_EOS, temperature=0.0, compile=True)
    engine = policy_engine(view, NO_EOS, compile=True)
    strides = {name: p.stride() for name, p in policy.named_parameters()}
    for p in policy.parameters():  # fused AdamW, as the trainer steps: in place, version counters unmoved
        p.grad = torch.randn_like(p)
    torch.optim.AdamW(policy.parameters(), lr=0.2, fused=True).step()
    after = sample(view, ids, mask, 6, eos_id=NO_EOS, temperature=0.0, compile=True)
    assert policy_engine(view, NO_EOS, compile=True) is engine  # the same engine and compiled step
    assert not torch.equal(before.completion_ids, after.completion_ids)
    torch.testing.assert_close(after.logprobs, full_forward_logprobs(policy, after), rtol=0, atol=1e-5)
    assert torch.equal(after.sequences, sample(view, ids, mask, 6, eos_id=NO_EOS, temperature=0.0).sequences)
    assert {name: p.stride() for name, p in policy.named_parameters()} == strides  # the policy is left alone


def test_the_rl_flag_turns_compiled_rollouts_on_unless_minimind_compile_is_0(monkeypatch):
    from minimind.train.rl import RL_DEFAULTS, RLOptions, add_rl_arguments

    parser = argparse.ArgumentParser()
    add_rl_arguments(parser, "grpo", RL_DEFAULTS)
    paths = ["--data", "d.jsonl", "--init", "model", "--out", "out"]
    assert parser.parse_args(paths).compile_rollouts is False  # off by default
    assert parser.parse_args([*paths, "--compile-rollouts"]).compile_rollouts is True
    assert parser.parse_args([*paths, "--compile-rollouts", "--no-compile-rollouts"]).compile_rollouts is False
    assert RLOptions.compile_rollouts is False
    model = tiny_model(1)
    monkeypatch.setenv("MINIMIND_COMPILE", "1")
    assert RLObjective(model, None, None, 2, 4, compile_rollouts=True).compile_rollouts
    assert not RLObjective(model, None, None, 2, 4).compile_rollouts
    monkeypatch.setenv("MINIMIND_COMPILE", "0")
    assert not RLObjective(model, None, None, 2, 4, compile_rollouts=True).compile_rollouts

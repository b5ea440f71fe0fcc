"""Rollouts in another dtype than the policy trains in (`--rollout-dtype`): sampled through a copy of the weights
in that dtype, refreshed every rollout, with the old-policy log-probs computed again by the policy itself."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model
from test_rl_reuse import _rl_run

from minimind.infer.options import compile_allowed
from minimind.kernels.training import TrainingLM
from minimind.train.rollout import left_pad, policy_engine, sample

PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62, 63], [1, 70]]
NO_EOS = 511


def test_a_bf16_rollout_of_an_fp32_policy_is_the_rollout_of_its_bf16_copy_and_follows_updates():
    policy = tiny_model(21).train()
    view = TrainingLM(policy)
    ids, mask = left_pad(PROMPTS, 0)
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}

    def alone(model):  # the same rollout from a bf16 copy made now
        return sample(copy.deepcopy(model).to(torch.bfloat16), ids, mask, 8, eos_id=NO_EOS, seed=5)

    ours = sample(view, ids, mask, 8, eos_id=NO_EOS, seed=5, dtype=torch.bfloat16)
    expected = alone(policy)
    assert torch.equal(ours.sequences, expected.sequences)
    torch.testing.assert_close(ours.logprobs, expected.logprobs, rtol=0, atol=0)
    # The policy is untouched: fp32, the same values, still training.
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert policy.training
    # Its fp32 rollout differs by rounding only somewhere: the copy really is bf16.
    fp32 = sample(view, ids, mask, 8, eos_id=NO_EOS, seed=5)
    assert not torch.equal(fp32.logprobs, ours.logprobs)
    # A fused AdamW step updates the fp32 weights in place; the next bf16 rollout samples the new ones.
    engine = policy_engine(view, NO_EOS, dtype=torch.bfloat16)
    for p in policy.parameters():
        p.grad = torch.randn_like(p)
    torch.optim.AdamW(policy.parameters(), lr=0.2, fused=True).step()
    after = sample(view, ids, mask, 8, eos_id=NO_EOS, seed=5, dtype=torch.bfloat16)
    assert policy_engine(view, NO_EOS, dtype=torch.bfloat16) is engine  # the copy is refilled, not rebuilt
    assert not torch.equal(after.sequences, ours.sequences)
    assert torch.equal(after.sequences, alone(policy).sequences)


@pytest.mark.slow
def test_grpo_with_bf16_rollouts_takes_its_old_log_probs_from_the_fp32_policy(tmp_path, model_dir):
    common = ["--max-steps", "4", "--lr", "1e-2", "--beta", "0.04", "--rollout-dtype", "bf16"]
    # One step per rollout batch: the old log-probs are the loss's own forward, so every step's ratio is 1. With
    # the bf16 copy's log-probs as the old ones it would carry bf16's rounding instead (ratio_max 1.0015 and
    # 1.0031 in the reused run below, measured with the rescoring switched off).
    for row in _rl_run(tmp_path, model_dir, "grpo", "once", *common):
        assert abs(row["ratio_mean"] - 1.0) < 1e-6 and abs(row["ratio_max"] - 1.0) < 1e-6
        assert row["clip_fraction"] == 0.0
    # Each rollout batch trained twice: rescored by the policy when sampled, so the first step on it has ratio 1
    # and the second, after an update, has moved.
    rows = _rl_run(tmp_path, model_dir, "grpo", "reused", *common, "--updates-per-rollout", "2")
    assert len(rows) == 4
    for first in (rows[0], rows[2]):
        assert abs(first["ratio_mean"] - 1.0) < 1e-6 and abs(first["ratio_max"] - 1.0) < 1e-6
        assert first["clip_fraction"] == 0.0
    assert max(abs(r["ratio_mean"] - 1.0) for r in (rows[1], rows[3])) > 1e-3  # the update moved it
    saved = json.loads((tmp_path / "reused" / "train_config.json").read_text())
    assert saved["extra"]["rollout_dtype"] == "bf16"


@pytest.mark.slow
def test_ppo_and_the_agent_take_the_rollout_dtype_too(tmp_path, model_dir, monkeypatch):
    rows = _rl_run(tmp_path, model_dir, "ppo", "ppo", "--max-steps", "2", "--lr", "1e-2", "--rollout-dtype", "bf16")
    assert all(abs(r["ratio_mean"] - 1.0) < 1e-6 and abs(r["ratio_max"] - 1.0) < 1e-6 for r in rows)
    # The agent's turns are sampled with the stage's rollout settings.
    from minimind.train.stages import agent

    taken = {}
    monkeypatch.setattr(agent, "roll_out_episodes", lambda *args: taken.setdefault("sample_fn", args[-1]))
    options = agent.AgentOptions(rollout_dtype="bf16", compile_rollouts=True)
    agent.AgentGRPO(tiny_model(3), None, {}, None, options).roll_out(tiny_model(3), {}, 2, 1.0)
    assert taken["sample_fn"].func is sample
    assert taken["sample_fn"].keywords == {"compile": compile_allowed(), "dtype": torch.bfloat16}

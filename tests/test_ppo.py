"""PPO: GAE, the clipped value loss, whitening, the actor-critic wrapper, and an end-to-end run whose value loss
falls."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from test_grpo import PROMPTS, letter_task, rl_args

from minimind.cli import main
from minimind.train.objective import token_nll
from minimind.train.reference import completion_head_logprobs
from minimind.train.rollout import left_pad, sample
from minimind.train.stages.ppo import ActorCritic, clipped_value_loss, gae, whiten


def test_gae_by_hand_and_nothing_leaks_past_a_rows_end():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: δ = (0.1, 0.1, 0.3); A_2 = 0.3, A_1 = 0.1 + 0.5·0.3, A_0 = 0.1 + 0.5·0.25
    # row 1 ends after two tokens: δ_1 = 1 − 0.4 (no bootstrap from the padded 9.0), δ_0 = 0.4 − 0.2
    expected = torch.tensor([[0.225, 0.25, 0.3], [0.2 + 0.5 * 0.6, 0.6, 0.0]])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * mask)
    discounted, _ = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3), gamma=0.9, lam=1.0)
    torch.testing.assert_close(discounted, torch.tensor([[0.81, 0.9, 1.0]]))  # λ = 1, V = 0: discounted return


def test_clipped_value_loss_takes_the_pessimistic_side():
    old, returns = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.0, 1.0, 1.0])
    values = torch.tensor([1.0, 0.0, 0.9])
    loss = clipped_value_loss(values, old, returns, clip=0.2)
    # clipped values 0.7, 0.3, 0.7 -> max(½(V−R)², ½(Vc−R)²)
    torch.testing.assert_close(loss, torch.tensor([0.5, 0.5, 0.5 * 0.3**2]))


def test_whiten_over_the_mask():
    values, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]]), torch.tensor([[1, 1, 1], [1, 0, 0]])
    white = whiten(values, mask)
    kept = white[mask.bool()]
    assert kept.mean().abs() < 1e-6 and (kept.pow(2).mean() - 1).abs() < 1e-5
    assert white[1, 1:].eq(0).all()


def test_actor_critic_keeps_the_policy_and_adds_a_zero_value_head():
    policy = tiny_model(2)
    critic = ActorCritic(policy)
    assert set(critic.state_dict()) == set(policy.state_dict()) | {"value_head.weight", "value_head.bias"}
    ids = torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = critic(ids)
        torch.testing.assert_close(out.logits, policy(ids).logits)
    assert out.values.shape == (2, 7) and out.values.eq(0).all()
    # With a head_loss_fn (the RL objectives' log-probs) no logits are made; the values are the same.
    keep = 4
    with torch.no_grad():
        fused = critic(ids, logits_to_keep=keep, head_loss_fn=partial(completion_head_logprobs, completion_ids=ids[:, -3:]))
        plain = critic(ids, logits_to_keep=keep)
    assert fused.logits is None
    torch.testing.assert_close(fused.values, plain.values)
    torch.testing.assert_close(fused.loss, -token_nll(plain.logits[:, :-1], ids[:, -3:]), rtol=0, atol=1e-5)
    prompt_ids, mask = left_pad(PROMPTS, 0)
    torch.manual_seed(0)
    via_critic = sample(critic, prompt_ids, mask, 5, eos_id=2)
    torch.manual_seed(0)
    via_policy = sample(policy, prompt_ids, mask, 5, eos_id=2)
    assert torch.equal(via_critic.sequences, via_policy.sequences)  # rollouts run through the wrapper unchanged
    unwrapped = critic.policy()  # what the run saves: the same trunk and head, the tie intact
    assert unwrapped.lm_head.weight is unwrapped.model.embed_tokens.weight is policy.lm_head.weight
    with torch.no_grad():
        torch.testing.assert_close(unwrapped(ids).logits, policy(ids).logits)


@pytest.mark.slow
def test_ppo_trains_end_to_end_with_a_falling_value_loss(tmp_path, tmp_path_factory, model_dir):
    task = letter_task(tmp_path_factory.getbasetemp() / "letter_task", model_dir)
    out = tmp_path / "ppo"
    assert main(rl_args("ppo", task, out, "--max-steps", "24", "--lr", "1e-3", "--vf-coef", "0.5")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    train = [r for r in rows if "value_loss" in r]
    assert len(train) == 24
    for r in train:
        assert all(math.isfinite(r[k]) for k in ("loss", "value_loss", "policy_loss", "kl", "reward_mean"))
    value_losses = [r["value_loss"] for r in train]
    first, last = sum(value_losses[:4]) / 4, sum(value_losses[-4:]) / 4
    summary = json.loads((out / "summary.json").read_text())
    print(f"\nPPO value loss (mean of first/last 4 steps) {first:.4f} -> {last:.4f}; sampled accuracy "
          f"{sum(r['accuracy'] for r in train[:4]) / 4:.3f} -> {sum(r['accuracy'] for r in train[-4:]) / 4:.3f}; "
          f"explained variance {train[0]['explained_variance']:.3f} -> {train[-1]['explained_variance']:.3f}; "
          f"held-out greedy accuracy {summary['held-out accuracy (greedy): --init']:.3f} -> "
          f"{summary['held-out accuracy (greedy): trained']:.3f}")
    assert last < first
    # A critic that had learned nothing (V = 0) would score ½·E[R²] ≈ ½·(mean² + std²) of the late rewards, which
    # have grown as the policy improved; the trained critic is far below that.
    untrained = sum(0.5 * (r["reward_mean"] ** 2 + r["reward_std"] ** 2) for r in train[-4:]) / 4
    assert last < 0.5 * untrained
    assert (out / "model.safetensors").is_file()
    head = load_file(str(out / "value_head.safetensors"))
    assert head["weight"].shape == (1, 64) and head["weight"].abs().sum() > 0

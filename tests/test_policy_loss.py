"""The GRPO-family losses (`minimind/train/policy_loss.py`) against TRL's `GRPOTrainer._compute_loss`, run as
TRL wrote it on identical inputs, and the pieces on hand numbers."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from minimind.train.policy_loss import aggregate, kl_estimate, per_token_loss, policy_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

G, PROMPTS, T, MAX_NEW = 4, 3, 7, 9


class _Accelerator:
    """What `_compute_loss` asks of accelerate on one process: identity gathers and reductions."""

    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(inputs: dict, logp: torch.Tensor, loss_type: str, beta: float, epsilon: float,
              epsilon_high: float, level: str) -> torch.Tensor:
    """TRL's own `_compute_loss` on a stand-in for the trainer whose model returns `logp` (one process, no
    accumulation, one optimizer step per generation batch)."""
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=MAX_NEW, accelerator=_Accelerator(),
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    return trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    n = G * PROMPTS
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (N, T) completions of different lengths
    old = -torch.rand(n, T, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(n, T, generator=g, dtype=torch.float64) * 0.5).requires_grad_()  # ratios around 1
    ref = old + torch.randn(n, T, generator=g, dtype=torch.float64) * 0.2
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.zeros(n, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    return inputs, logp, old, ref, advantages, mask


@pytest.mark.parametrize("loss", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("clip_high", [0.2, 0.28])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_losses_match_trl_grpo_trainer(loss, beta, clip_high, level):
    inputs, logp, old, ref, advantages, mask = _inputs(len(loss) * 7 + int(beta * 100) + int(clip_high * 100))
    # TRL's cispo caps the weight at epsilon_high itself; ours at 1 + ε_high (as MiniMax writes the bound).
    trl_high = 1.0 + clip_high if loss == "cispo" else clip_high
    expected = _trl_loss(inputs, logp, loss, beta, 0.2, trl_high, level)
    ours = policy_loss(logp, old, ref, advantages, mask, G, MAX_NEW, loss, beta, 0.2, clip_high, level, "k3")
    got = ours.loss_sum / ours.count  # what the trainer makes of it (one micro-batch, one process)
    assert abs(got.item() - expected.item()) < 1e-6
    # The gradients agree too (cispo's detached weight, the clip's dead zone).
    (grad_trl,) = torch.autograd.grad(expected, logp)
    (grad_ours,) = torch.autograd.grad(got, logp)
    torch.testing.assert_close(grad_ours, grad_trl, rtol=0, atol=1e-9)
    assert ours.clipped.any() or level == "sequence"  # the inputs reach the clip (the cap, for cispo)


def test_kl_estimators_and_clip_on_hand_numbers():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([[0.125, 0.0]]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([[math.exp(-0.5) + 0.5 - 1, 0.0]]))
    mask = torch.ones(1, 2)
    # r = e^0.5 ≈ 1.65 with A = 1: clipped at 1 + ε_high, asymmetric bounds.
    old = logp - torch.tensor([[0.5, -0.5]])
    loss, clipped, _ = per_token_loss(logp, old, torch.tensor([1.0]), mask, "grpo", clip=0.2, clip_high=0.3)
    torch.testing.assert_close(loss, torch.tensor([[-1.3, -math.exp(-0.5)]]))
    assert clipped.tolist() == [[True, False]]
    # With A = −1 the low bound binds on the second token (r ≈ 0.61 < 0.8).
    loss, clipped, _ = per_token_loss(logp, old, torch.tensor([-1.0]), mask, "grpo", clip=0.2, clip_high=0.3)
    torch.testing.assert_close(loss, torch.tensor([[math.exp(0.5), 0.8]]))
    assert clipped.tolist() == [[False, True]]
    # Averaging: two completions of one prompt, 1 and 2 tokens.
    token_loss, mask = torch.tensor([[2.0, 9.0], [1.0, 3.0]]), torch.tensor([[1, 0], [1, 1]])
    assert aggregate(token_loss, mask, "grpo", 2, 4)[0].item() == pytest.approx((2.0 + 2.0) / 2)
    assert aggregate(token_loss, mask, "bnpo", 2, 4)[0].item() == pytest.approx(6.0 / 3)
    assert aggregate(token_loss, mask, "dr_grpo", 2, 4)[0].item() == pytest.approx(6.0 / 8)
    assert [x.item() for x in aggregate(token_loss, mask, "dapo", 2, 4)] == [6.0, 3.0]

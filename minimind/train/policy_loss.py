"""The policy-gradient losses of `minimind grpo` (and `minimind agent`), as pure functions: tensors in, tensors out.

Inputs per completion token, all (N, T) over N sampled completions of T columns: `logp` = log π(o_t) (with grad),
`old_logp` = log π_old(o_t) (the policy that sampled, recorded while sampling), `ref_logp` = log π_ref(o_t), and
`mask` = 1 on generated tokens; `advantages` (N,) or (N, T). With r = exp(log-weight), the log-weight being
logp − old_logp per token, or its mean over the completion's tokens for `importance_sampling="sequence"` (GSPO):

    grpo, bnpo, dr_grpo, dapo:  ℓ_t = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A) + β·KL_t
    cispo:                      ℓ_t = −sg(min(r, 1 + ε_high))·A·log π(o_t) + β·KL_t   (sg: no gradient)

and they differ in how the token losses are averaged (the trainer divides each loss_sum by the step's count):

    grpo     mean over completions of each completion's token mean        count = prompts
    bnpo     token mean over the micro-batch (weighted by its prompts)    count = prompts
    dr_grpo  Σ tokens / (completions · max_new_tokens)                    count = prompts
    dapo     Σ tokens / Σ tokens of the whole optimizer step              count = tokens
    cispo    as dapo

KL_t is k1 = logp − ref, k2 = ½(logp − ref)² or k3 = e^{ref − logp} − (ref − logp) − 1 (unbiased, ≥ 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING = ("token", "sequence")
TOKEN_COUNTED = ("dapo", "cispo")  # losses whose trainer count is the step's completion tokens


@dataclass
class PolicyLoss:
    """What `policy_loss` returns: the micro-batch's loss_sum (divide by `count`) and per-token parts."""

    loss_sum: torch.Tensor  # () with grad
    count: torch.Tensor  # () this micro-batch's share of the trainer's count (prompts, or tokens)
    kl: torch.Tensor  # (N, T) the KL estimate per token, detached
    clipped: torch.Tensor  # (N, T) or (N, 1) bool: the clip bound (grpo family) or the IS weight was capped (cispo)
    ratio: torch.Tensor  # (N, T) or (N, 1) the importance weight r, detached


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π: k1, k2 or k3 (see the module docstring)."""
    diff = ref_logp - logp  # log π_ref/π, (N, T)
    if estimator == "k1":
        return -diff
    if estimator == "k2":
        return 0.5 * diff**2
    if estimator == "k3":
        return torch.exp(diff) - diff - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def log_importance_weights(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                           level: str = "token") -> torch.Tensor:
    """log π/π_old per token (N, T), or its mean over each completion's tokens (N, 1) at level "sequence"."""
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level == "sequence":
        mask = mask.to(log_ratio.dtype)
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]
    raise ValueError(f"unknown importance sampling level {level!r}; expected one of {IMPORTANCE_SAMPLING}")


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   loss: str = "grpo", clip: float = 0.2, clip_high: float | None = None,
                   importance_sampling: str = "token") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The policy term of each token before averaging -> (loss (N, T) or (N, 1), clipped, ratio r).

    `clip_high` (ε_high) defaults to `clip`; for cispo 1 + ε_high caps the importance weight.
    """
    clip_high = clip if clip_high is None else clip_high
    if advantages.dim() == 1:
        advantages = advantages[:, None]  # (N, 1): one advantage per completion
    ratio = torch.exp(log_importance_weights(logp, old_logp, mask, importance_sampling))
    if loss == "cispo":
        weight = ratio.clamp(max=1.0 + clip_high).detach()
        return -weight * advantages * logp, ratio.detach() > 1.0 + clip_high, ratio.detach()
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped, ratio.detach()


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss: str, group_size: int,
              max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) token losses (or (N, 1), broadcast over the mask) -> (loss_sum, count) of one micro-batch, averaged
    as `loss` asks (module docstring); N = prompts · group_size, completions of a prompt in consecutive rows."""
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask  # (N, T)
    prompts = torch.tensor(float(mask.shape[0] // group_size), device=mask.device)
    if loss == "grpo":
        per_completion = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_completion.sum() / group_size, prompts
    if loss == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) * prompts, prompts
    if loss == "dr_grpo":
        return masked.sum() / (group_size * max_new_tokens), prompts
    if loss in TOKEN_COUNTED:
        return masked.sum(), mask.sum()
    raise ValueError(f"unknown loss {loss!r}; expected one of {LOSSES}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, group_size: int, max_new_tokens: int, loss: str = "grpo", beta: float = 0.04,
                clip: float = 0.2, clip_high: float | None = None, importance_sampling: str = "token",
                kl_estimator: str = "k3") -> PolicyLoss:
    """The whole GRPO-family loss of one micro-batch: policy term + β·KL per token, averaged as `loss` asks."""
    token_loss, clipped, ratio = per_token_loss(logp, old_logp, advantages, mask, loss, clip, clip_high,
                                                importance_sampling)
    kl = kl_estimate(logp, ref_logp, kl_estimator)
    if beta != 0.0:
        token_loss = token_loss + beta * kl
    loss_sum, count = aggregate(token_loss, mask, loss, group_size, max_new_tokens)
    return PolicyLoss(loss_sum, count, kl.detach(), clipped, ratio)

"""The distillation loss straight from hidden states: α·CE + (1 − α)·T²·KL(teacher_T ‖ student_T), chunk by chunk.

Like every other training loss here (minimind/kernels/head_loss.py), it never holds the (tokens x vocab) logits of
the student or the teacher: for one chunk of rows at a time, both heads run, the chunk's loss and its gradient in
the student's logits are computed, and that gradient goes straight into the student's hidden states and head
weight (`fused_head_loss`). Positions outside the loss mask are dropped before either head runs (on CPU).

Gradient of one row, student logits s, teacher logits t, target y, q = softmax(s/T), p = softmax(t/T):
    d/ds [ce_w · (−log softmax(s)_y) + kl_w · T² · KL(p ‖ q)] = ce_w · (softmax(s) − onehot(y)) + kl_w · T · (q − p)
"""

from __future__ import annotations

import torch
from torch import nn

from minimind.kernels.head_loss import (
    chunk_nll,
    chunk_rows,
    fused_head_loss,
    is_fusable,
    needs_grad,
    softmax_minus_one_hot,
    weighted_rows,
)


def distill_head_loss(hidden: torch.Tensor, head: nn.Module, *, targets: torch.Tensor, mask: torch.Tensor,
                      alpha: float = 1.0, temperature: float = 1.0, ce_weights: torch.Tensor | None = None,
                      teacher_hidden: torch.Tensor | None = None, teacher_head: nn.Module | None = None):
    """-> (loss, Σ mask·nll, Σ mask·KL), float32 scalars; only the loss carries gradients.

    loss = Σ mask · (α · ce_weights · nll + (1 − α) · T² · KL(softmax(teacher/T) ‖ softmax(student/T))).
    hidden (B, T, dim) are the student's final hidden states and `head` its output layer; targets (B, T) the next
    tokens; mask (B, T) the loss mask; ce_weights (B, T) extra CE weights (reasoning tags), None = 1. Without a
    teacher (teacher_hidden None) the KL term and its sum are 0. For `model(..., head_loss_fn=partial(...))`.
    """
    flat = [None if x is None else x.reshape(-1, x.shape[-1]) for x in (hidden, teacher_hidden)]
    mask = mask.reshape(-1).float()
    ce_w = alpha * mask * (1.0 if ce_weights is None else ce_weights.reshape(-1).float())
    kl_w = (1.0 - alpha) * mask
    mask, targets, hidden, teacher_hidden, ce_w, kl_w = weighted_rows(mask, targets.reshape(-1), *flat, ce_w, kl_w)
    chunks = _DistillChunks(targets, mask, ce_w, kl_w, temperature, teacher_hidden, teacher_head)
    compiling = torch.compiler.is_compiling()
    if is_fusable(head, compiling) and needs_grad(hidden, head.weight):
        loss, sums = fused_head_loss(hidden, head.weight, chunk_rows(head.weight.shape[0], hidden.device),
                                     chunks.loss_and_grad)
        return loss, sums[0], sums[1]
    # No gradients wanted (eval), or a head that must run as a module: autograd through the plain form, all rows
    # at once when it needs gradients, else chunk by chunk.
    rows = max(1, hidden.shape[0]) if torch.is_grad_enabled() else chunk_rows(head.weight.shape[0], hidden.device)
    parts = [chunks.terms(head(hidden[i:i + rows]), i)[:2] for i in range(0, max(1, hidden.shape[0]), rows)]
    loss = torch.stack([p[0] for p in parts]).sum()
    sums = torch.stack([p[1] for p in parts]).sum(0)
    return loss, sums[0], sums[1]


def kl_parts(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float):
    """KL(softmax(t/T) ‖ softmax(s/T)) over the last dim, in float32, with log softmax(s/T) and softmax(t/T)
    (what its gradient in s is made of)."""
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    return (p * (log_p - log_q)).sum(-1), log_q, p


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T)) at every position: (B, T, V) x 2 -> (B, T), in float32."""
    return kl_parts(teacher_logits, student_logits, temperature)[0]


class _DistillChunks:
    """The loss terms of rows [start, start + n) of the kept rows, given the student's logits for them."""

    def __init__(self, targets, mask, ce_w, kl_w, temperature, teacher_hidden, teacher_head):
        self.targets, self.mask, self.ce_w, self.kl_w = targets, mask, ce_w, kl_w
        self.temperature, self.teacher_hidden, self.teacher_head = temperature, teacher_hidden, teacher_head

    def terms(self, logits: torch.Tensor, start: int):
        """-> (loss sum, [Σ mask·nll, Σ mask·KL], float32 student logits, their logsumexp, log q, p)."""
        rows = slice(start, start + logits.shape[0])
        targets, mask, temperature = self.targets[rows], self.mask[rows], self.temperature
        nll, s, lse = chunk_nll(logits, targets)
        loss = (nll * self.ce_w[rows]).sum()
        log_q = p = None
        kl_sum = loss.new_zeros(())
        if self.teacher_hidden is not None:
            with torch.no_grad():
                teacher_logits = self.teacher_head(self.teacher_hidden[rows])
            kl, log_q, p = kl_parts(teacher_logits, s, temperature)
            loss = loss + temperature**2 * (kl * self.kl_w[rows]).sum()
            kl_sum = (kl * mask).sum()
        return loss, torch.stack([(nll * mask).sum(), kl_sum]), s, lse, log_q, p

    def loss_and_grad(self, logits: torch.Tensor, start: int):
        """`chunk_loss` for `fused_head_loss`: (loss sum, d loss / d logits, metric sums), without autograd."""
        with torch.no_grad():
            loss, sums, s, lse, log_q, p = self.terms(logits, start)
            rows = slice(start, start + logits.shape[0])
            grad = softmax_minus_one_hot(s, lse, self.targets[rows]).mul_(self.ce_w[rows, None])
            if log_q is not None:
                grad.add_(log_q.exp_().sub_(p).mul_(self.kl_w[rows, None] * self.temperature))
        return loss, grad, sums

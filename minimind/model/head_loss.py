"""Training loss straight from the last hidden states: the output head and cross-entropy, a chunk of rows at a time.

The plain path, `cross_entropy(lm_head(hidden).float(), targets)`, keeps several (rows x vocab) float32 tensors
alive between forward and backward (the logits, their float copy, the log-softmax) and makes two more in backward.
`head_cross_entropy` instead runs the head on a chunk of rows, turns the chunk's logits into its loss and, right
away, into the gradients of the hidden states and of the head weight; only those gradients (the size of the hidden
states and of the weight) are kept for backward. The same three GEMMs run (logits, dX, dW) and nothing is
recomputed, but the largest live tensor is one chunk's logits.

Rows whose weight is 0 (prompt and padding positions of SFT rows) are dropped before the head on CPU, so they
cost no head FLOPs. On a GPU all rows go through (their weight zeroes them): dropping them needs the count of kept
rows on the host, a synchronisation in the middle of every forward.

This file is copied into saved model directories with modeling_minimind.py: torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows per chunk: a chunk's float32 logits are about this many bytes on a CPU (8x on a GPU, whose GEMMs need
# more rows to fill the device). 16 MB is 655 rows of a 6,400-token vocabulary. The head of `small` over 2,048
# rows, forward + backward, two runs on the project's 2-core CPU (best of 10): 261 / 328 ms at 655 rows per
# chunk, 244 / 320 at 1,310, 296 / 356 at 327, 332 / 394 at 163: short chunks shorten the reduction of the
# weight-gradient GEMMs.
CHUNK_BYTES = 16 << 20
MIN_CHUNK_ROWS = 64


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk for a head of `vocab_size` outputs (GPUs get 8x the rows of CPUs)."""
    budget = CHUNK_BYTES * (8 if device.type == "cuda" else 1)
    return max(MIN_CHUNK_ROWS, budget // (4 * vocab_size))


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ weight · (-log p(target)) over positions, as a float32 scalar.

    hidden (..., dim) are the final (normed) hidden states, `head` the output layer, targets (...) token ids,
    weights (...) per-position loss weights (None: all 1; 0 drops a position; its target is then never read).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    weights = torch.ones_like(targets, dtype=torch.float32) if weights is None else weights.reshape(-1).float()
    compiling = torch.compiler.is_compiling()
    if hidden.device.type == "cpu" and not compiling:
        keep = weights != 0
        if not bool(keep.all()):
            hidden, targets, weights = hidden[keep], targets[keep], weights[keep]
    else:
        targets = torch.where(weights != 0, targets, torch.zeros_like(targets))
    fused = type(head) is nn.Linear and head.bias is None and not compiling
    if not fused:  # a LoRA-wrapped or quantized head, or inside torch.compile (which fuses the plain form itself)
        logits = head(hidden).float()
        return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()
    weight = head.weight
    rows = chunk_rows(weight.shape[0], hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedHeadLoss.apply(hidden, weight, targets, weights, rows)
    return sum((_chunk_loss(hidden[i:i + rows] @ weight.t(), targets[i:i + rows], weights[i:i + rows])[0]
                for i in range(0, hidden.shape[0], rows)), torch.zeros((), device=hidden.device))


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """-> (Σ weight · nll over the chunk, float32 logits, their logsumexp)."""
    logits = logits.float()
    lse = logits.logsumexp(-1)
    nll = lse - logits.gather(1, targets[:, None]).squeeze(1)
    return (nll * weights).sum(), logits, lse


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, rows):
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], rows):
            h, t, w = hidden[i:i + rows], targets[i:i + rows], weights[i:i + rows]
            logits = h @ weight.t()  # under autocast: the autocast dtype, like the plain head
            loss, probs, lse = _chunk_loss(logits, t, w)
            total += loss
            # d(Σ w·nll)/d logits = w · (softmax - one_hot(target)), built in place in the float32 logits.
            probs.sub_(lse[:, None]).exp_()
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad_logits = probs.mul_(w[:, None]).to(logits.dtype)
            if grad_logits.dtype == weight.dtype == hidden.dtype == torch.float32:
                # In place, no temporaries: the accumulating GEMM adds into the weight gradient as it goes.
                if need_hidden:
                    torch.mm(grad_logits, weight, out=grad_hidden[i:i + rows])
                if need_weight:
                    grad_weight.addmm_(grad_logits.t(), h)
                continue
            if need_hidden:  # autocast: the GEMMs run in its dtype; results are cast into the float32 buffers
                grad_hidden[i:i + rows] = grad_logits @ weight
            if need_weight:
                grad_weight += grad_logits.t() @ h
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None

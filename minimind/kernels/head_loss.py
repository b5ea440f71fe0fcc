"""Training loss straight from the last hidden states: the output head and cross-entropy, a chunk of rows at a time.

The plain path, `cross_entropy(lm_head(hidden).float(), targets)`, keeps several (rows x vocab) float32 tensors
alive between forward and backward (the logits, their float copy, the log-softmax) and makes two more in backward.
`head_cross_entropy` instead runs the head on a chunk of rows, turns the chunk's logits into its loss and, right
away, into the gradients of the hidden states and of the head weight; only those gradients (the size of the hidden
states and of the weight) are kept for backward. The same three GEMMs run (logits, dX, dW) and nothing is
recomputed, but the largest live tensor is one chunk's logits. One sum per row (`per_row`, DPO's sequence
log-probs) has a different gradient for each row, known only in backward, so there the logits of each chunk are
recomputed in backward instead: one more head GEMM, still no logits kept.

`fused_head_loss` is the same machinery for any loss of the logits whose gradient in them a chunk can compute
on its own (distillation's CE + KL against a teacher, minimind/train/distill_loss.py).

Rows whose weight is 0 (prompt and padding positions of SFT rows) are dropped before the head on CPU, so they
cost no head FLOPs. On a GPU all rows go through (their weight zeroes them): dropping them needs the count of kept
rows on the host, a synchronisation in the middle of every forward.

The training objectives reach it through `minimind.kernels.training.TrainingLM`, the module the strategies wrap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Rows per chunk: a chunk's float32 logits are about this many bytes on a CPU (8x on a GPU, whose GEMMs need
# more rows to fill the device). 16 MB is 655 rows of a 6,400-token vocabulary. Shorter chunks are slower (they
# shorten the reduction of the weight-gradient GEMMs); twice the rows gains little for twice the memory (the
# chunk-size sweep is in docs/performance.md).
CHUNK_BYTES = 16 << 20
MIN_CHUNK_ROWS = 64


def chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk for a head of `vocab_size` outputs (GPUs get 8x the rows of CPUs)."""
    budget = CHUNK_BYTES * (8 if device.type == "cuda" else 1)
    return max(MIN_CHUNK_ROWS, budget // (4 * vocab_size))


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                       weights: torch.Tensor | None = None, per_row: bool = False) -> torch.Tensor:
    """Σ weight · (-log p(target)) over positions, as a float32 scalar (`per_row`: one sum per row, (B,)).

    hidden (B, T, dim) are the final (normed) hidden states, `head` the output layer, targets (B, T) token ids,
    weights (B, T) per-position loss weights (None: all 1; 0 drops a position; its target is then never read).
    The scalar sum makes its gradients in forward (`_FusedHeadLoss`); per-row sums recompute each chunk's
    logits in backward (`_RecomputedHeadNLL`).
    """
    lead = targets.shape
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    weights = torch.ones_like(targets, dtype=torch.float32) if weights is None else weights.reshape(-1).float()
    row_of = torch.arange(targets.shape[0], device=targets.device) // lead[-1] if per_row else None
    compiling = torch.compiler.is_compiling()
    weights, targets, hidden, row_of = weighted_rows(weights, targets, hidden, row_of)
    if per_row:
        weighted = _position_nll(hidden, head, targets, compiling) * weights
        return torch.zeros(lead[:-1].numel(), device=weighted.device).index_add(0, row_of, weighted).view(lead[:-1])
    if is_fusable(head, compiling) and needs_grad(hidden, head.weight):
        rows = chunk_rows(head.weight.shape[0], hidden.device)
        return fused_head_loss(hidden, head.weight, rows, _cross_entropy_chunks(targets, weights))[0]
    return (_position_nll(hidden, head, targets, compiling) * weights).sum()


def head_token_nll(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) at every position: hidden (..., dim), targets (...) -> (...) float32, no logits kept.

    For losses that need each token's log-prob (the RL objectives' ratios and KL): with gradients, each chunk's
    logits are recomputed in backward (`_RecomputedHeadNLL`); without, the chunks are scored and dropped.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _position_nll(flat, head, targets.reshape(-1), torch.compiler.is_compiling()).view(targets.shape)


def weighted_rows(weights: torch.Tensor, targets: torch.Tensor, *rows: torch.Tensor | None):
    """The rows that count: on CPU, those whose weight is not 0 (of weights, targets and every other per-row
    tensor; None passes through). Elsewhere, and inside torch.compile, all rows, with the targets of weight-0
    rows set to 0 (they may be -100 or padding and are never read otherwise)."""
    if weights.device.type == "cpu" and not torch.compiler.is_compiling():
        keep = weights != 0
        if bool(keep.all()):
            return (weights, targets, *rows)
        return tuple(None if x is None else x[keep] for x in (weights, targets, *rows))
    return (weights, torch.where(weights != 0, targets, torch.zeros_like(targets)), *rows)


def is_fusable(head: nn.Module, compiling: bool) -> bool:
    """A plain linear head outside torch.compile. Otherwise (a LoRA-wrapped or quantized head, or inside
    torch.compile, which fuses the plain form itself) the head runs as a module on all kept rows at once."""
    return type(head) is nn.Linear and head.bias is None and not compiling


def needs_grad(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether autograd will want gradients (otherwise the chunk loop computes the loss alone)."""
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def _position_nll(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, compiling: bool) -> torch.Tensor:
    """-log p(target) at each row of hidden (N, dim) -> (N,) float32, without keeping the logits when it can."""
    if not is_fusable(head, compiling):
        if torch.is_grad_enabled() or compiling:
            return F.cross_entropy(head(hidden).float(), targets, reduction="none")
        rows = chunk_rows(head.out_features, hidden.device)  # scoring through a packed/int8 head: no logits kept
        return torch.cat([F.cross_entropy(head(hidden[i:i + rows]).float(), targets[i:i + rows], reduction="none")
                          for i in range(0, max(1, hidden.shape[0]), rows)])
    rows = chunk_rows(head.weight.shape[0], hidden.device)
    if needs_grad(hidden, head.weight):
        return _RecomputedHeadNLL.apply(hidden, head.weight, targets, rows)
    return _chunked_nll(hidden, head.weight, targets, rows)


def _chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
    """nll (N,) chunk by chunk, keeping no logits (no autograd: the callers handle gradients)."""
    return torch.cat([chunk_nll(hidden[i:i + rows] @ weight.t(), targets[i:i + rows])[0]
                      for i in range(0, hidden.shape[0], rows)] or [hidden.new_zeros(0, dtype=torch.float32)])


def chunk_nll(logits: torch.Tensor, targets: torch.Tensor):
    """-> (nll per row of the chunk, its float32 logits, their logsumexp)."""
    logits = logits.float()
    lse = logits.logsumexp(-1)
    return lse - logits.gather(1, targets[:, None]).squeeze(1), logits, lse


def softmax_minus_one_hot(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d nll / d logits = softmax - one_hot(target), built in place in the float32 logits."""
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(targets.shape[0], device=targets.device), targets] -= 1.0
    return probs


def _add_chunk_grads(grad_logits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                     grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None, start: int) -> None:
    """Write the chunk's hidden-state gradient at rows [start, ...) and add its share of the weight gradient."""
    rows = slice(start, start + h.shape[0])
    if grad_logits.dtype == weight.dtype == h.dtype == torch.float32:
        # In place, no temporaries: the accumulating GEMM adds into the weight gradient as it goes.
        if grad_hidden is not None:
            torch.mm(grad_logits, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), h)
        return
    if grad_hidden is not None:  # autocast: the GEMMs run in its dtype; results are cast into the buffers
        grad_hidden[rows] = grad_logits @ weight
    if grad_weight is not None:
        grad_weight += grad_logits.t() @ h


def fused_head_loss(hidden: torch.Tensor, weight: torch.Tensor, rows: int, chunk_loss) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss over the head's logits, computed `rows` rows at a time with its gradients made in forward.

    `chunk_loss(logits, start)` gets one chunk's logits (n, vocab; the autocast dtype) for hidden rows
    [start, start + n) and returns (its loss sum, d loss / d logits as float32 (n, vocab), a float32 vector of
    metric sums). Returns (loss, metric sums): the loss has gradients for hidden and weight; the metrics none.
    """
    return _FusedHeadLoss.apply(hidden, weight, rows, chunk_loss)


def _cross_entropy_chunks(targets: torch.Tensor, weights: torch.Tensor):
    """`chunk_loss` of Σ weights · nll for `fused_head_loss` (no metrics)."""
    def chunk_loss(logits: torch.Tensor, start: int):
        t, w = targets[start:start + logits.shape[0]], weights[start:start + logits.shape[0]]
        nll, probs, lse = chunk_nll(logits, t)
        return (nll * w).sum(), softmax_minus_one_hot(probs, lse, t).mul_(w[:, None]), nll.new_zeros(0)
    return chunk_loss


class _FusedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, chunk_loss):
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total, metrics = torch.zeros((), dtype=torch.float32, device=hidden.device), 0
        for i in range(0, hidden.shape[0], rows):
            h = hidden[i:i + rows]
            logits = h @ weight.t()  # under autocast: the autocast dtype, like the plain head
            dtype = logits.dtype
            loss, grad_logits, chunk_metrics = chunk_loss(logits, i)
            del logits  # under autocast a 16-bit copy the float32 gradient no longer needs: free it before the cast
            total += loss
            metrics = metrics + chunk_metrics
            _add_chunk_grads(grad_logits.to(dtype), h, weight, grad_hidden, grad_weight, i)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        if not torch.is_tensor(metrics):  # no rows at all
            metrics = chunk_loss(hidden.new_zeros(0, weight.shape[0]), 0)[2]
        ctx.mark_non_differentiable(metrics)
        return total, metrics

    @staticmethod
    def backward(ctx, grad_total, _grad_metrics):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


class _RecomputedHeadNLL(torch.autograd.Function):
    """nll per row; forward keeps no logits, backward recomputes each chunk's under the forward's autocast."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.rows = rows
        ctx.save_for_backward(hidden, weight, targets)
        return _chunked_nll(hidden, weight, targets, rows)

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            for i in range(0, hidden.shape[0], ctx.rows):
                h, t = hidden[i:i + ctx.rows], targets[i:i + ctx.rows]
                logits = h @ weight.t()
                _, probs, lse = chunk_nll(logits, t)
                grad_logits = softmax_minus_one_hot(probs, lse, t).mul_(grad_nll[i:i + ctx.rows, None])
                _add_chunk_grads(grad_logits.to(logits.dtype), h, weight, grad_hidden, grad_weight, i)
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None

"""Causal self-attention on the CPU as blocks of batched GEMMs, with a flash-style backward.

PyTorch's CPU flash-attention kernel spends about a fifth of a `small` training step (4 x 512, fp32) in
attention while its arithmetic is ~5% of the step's FLOPs: it runs at a fraction of the GEMM speed
(docs/performance.md). Here the query positions are cut into blocks of `BLOCK`; each block attends to the keys
up to its own end, so the part above the diagonal is never computed, and every product is one MKL batched
GEMM whose rows are the block's positions times the query heads that share a K/V head (GQA without copying
K/V). Like flash attention, the forward keeps no (T x T) probabilities: the backward recomputes each block's
from Q Kᵀ, and uses delta = rowsum(dO * O) for the softmax gradient. Memory is therefore that of SDPA; the
arithmetic is one more GEMM per block than keeping the probabilities would need.

Selected for CPU training (`minimind.kernels.use_kernels(model, "cpu-training")`), where it runs for fp32 causal
self-attention of the lengths `use_causal_blocks` names; elsewhere SDPA is the better kernel.
"""

from __future__ import annotations

import math

import torch

# 32 query positions x 4 query heads per K/V head = 128 GEMM rows per block: on `small`, blocks of 16, 32 and 48
# positions measured the same, 64 and 128 slower (docs/performance.md).
BLOCK = 32
# Under torch.compile each block of its own shape becomes kernels of their own, so fewer, larger blocks compile
# much sooner; traced blocks still beat blocks left out of the graph per step (compile and step times in
# docs/performance.md).
COMPILED_BLOCK = 64
# Forward + backward beat SDPA from MIN_LENGTH to MAX_LENGTH positions (the sweep is in docs/performance.md);
# they are about even at 192-256 and slower at 64-128 and at 2,048 (a block's scores no longer stay in cache).
# Forward alone gains less, so inference keeps SDPA.
MIN_LENGTH, MAX_LENGTH = 320, 1024


def use_causal_blocks(q: torch.Tensor, k: torch.Tensor, dropout: float) -> bool:
    """Whether `causal_block_attention` should run: causal self-attention of fp32 CPU tensors that need a
    gradient, of a length where it measured faster than SDPA, without attention dropout."""
    t = q.shape[2]
    return (
        q.device.type == "cpu" and q.dtype == torch.float32 and q.requires_grad and torch.is_grad_enabled()
        and not dropout and t == k.shape[2] and MIN_LENGTH <= t <= MAX_LENGTH
    )


def causal_block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D) + causal mask) v for q (B, H, T, D) and k, v (B, H_kv, T, D), H a multiple of
    H_kv. Returns (B, H, T, D) laid out in memory as (B, T, H, D), so merging the heads after it copies nothing."""
    return _CausalBlocks.apply(q, k, v, block or (COMPILED_BLOCK if torch.compiler.is_compiling() else BLOCK))


def _diagonal_hide(rows: int, n_rep: int, device: torch.device) -> torch.Tensor:
    """True where a block's row (position i, head j as row i * n_rep + j) must not see the block's own key i'."""
    position = torch.arange(rows, device=device) // n_rep
    return torch.arange(rows // n_rep, device=device)[None, :] > position[:, None]


def _to_rows(x: torch.Tensor, n_kv: int) -> torch.Tensor:
    """(B, H, T, D) -> (B * H_kv, T * n_rep, D): each K/V head's queries, row t * n_rep + j for position t and
    head j of its group, so a block of positions is a contiguous run of rows. One copy."""
    b, h, t, d = x.shape
    return x.reshape(b, n_kv, h // n_kv, t, d).transpose(2, 3).reshape(b * n_kv, t * (h // n_kv), d)


def _from_rows(rows: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """The inverse of `_to_rows`: (B * H_kv, T * n_rep, D) -> (B, H, T, D) laid out as (B, T, H, D). One copy."""
    n_kv, d = rows.shape[0] // b, rows.shape[-1]
    t = rows.shape[1] * n_kv // h
    return rows.view(b, n_kv, t, h // n_kv, d).transpose(1, 2).contiguous().view(b, t, h, d).transpose(1, 2)


class _CausalBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block):
        b, h, t, d = q.shape
        n_kv = k.shape[1]
        n_rep = h // n_kv
        scale = 1.0 / math.sqrt(d)
        # The 1/sqrt(D) goes on the keys (a quarter of the queries' size under GQA); the copy is needed anyway.
        qr, kr, vr = _to_rows(q, n_kv), (k * scale).reshape(b * n_kv, t, d), v.reshape(b * n_kv, t, d)
        hide = _diagonal_hide(block * n_rep, n_rep, q.device)
        outs = []
        for start in range(0, t, block):
            stop = min(start + block, t)
            probs = _block_probs(qr[:, start * n_rep : stop * n_rep], kr[:, :stop], start, hide)
            outs.append(torch.bmm(probs, vr[:, :stop]))
        out = torch.cat(outs, dim=1)
        ctx.save_for_backward(qr, kr, vr, out)
        ctx.shape, ctx.block, ctx.scale, ctx.hide = (b, h, t, d), block, scale, hide
        return _from_rows(out, b, h)

    @staticmethod
    def backward(ctx, grad):
        qr, kr, vr, out = ctx.saved_tensors
        (b, h, t, d), block, hide = ctx.shape, ctx.block, ctx.hide
        n_kv = kr.shape[0] // b
        n_rep = h // n_kv
        grad_rows = _to_rows(grad, n_kv)
        delta = (grad_rows * out).sum(-1, keepdim=True)  # = rowsum(dP * P), the softmax gradient's correction
        dk, dv = torch.zeros_like(kr), torch.zeros_like(vr)
        dqs = []
        for start in range(0, t, block):
            stop = min(start + block, t)
            rows = slice(start * n_rep, stop * n_rep)
            probs = _block_probs(qr[:, rows], kr[:, :stop], start, hide)
            _accumulate_product(dv[:, :stop], probs.transpose(1, 2), grad_rows[:, rows])
            scores_grad = torch.bmm(grad_rows[:, rows], vr[:, :stop].transpose(1, 2)).sub_(delta[:, rows]).mul_(probs)
            dqs.append(torch.bmm(scores_grad, kr[:, :stop]))
            _accumulate_product(dk[:, :stop], scores_grad.transpose(1, 2), qr[:, rows])
        dq = _from_rows(torch.cat(dqs, dim=1), b, h)
        return dq, dk.mul_(ctx.scale).view(b, n_kv, t, d), dv.view(b, n_kv, t, d), None


def _accumulate_product(into: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """into += a @ b for a slice `into` of a larger gradient. Eagerly, `baddbmm_` on a strided slice falls back to
    one GEMM per batch entry (twice the time per FLOP in a profile), so the product is formed whole and added;
    traced by torch.compile the addition to a slice becomes a slow scatter kernel, which `baddbmm_` avoids."""
    if torch.compiler.is_compiling():
        into.baddbmm_(a, b)
    else:
        into += torch.bmm(a, b)


def _block_probs(q_rows: torch.Tensor, keys: torch.Tensor, start: int, hide: torch.Tensor) -> torch.Tensor:
    """Softmax over keys [0, stop) of one block of query rows (keys already scaled); its own positions causally."""
    scores = torch.bmm(q_rows, keys.transpose(1, 2))
    own = scores[:, :, start:]
    own.masked_fill_(hide[: own.shape[1], : own.shape[2]], float("-inf"))
    return torch.softmax(scores, dim=-1)

"""Attention implementations beside the model's own, and where each one is meant to run.

Each takes (module, q, k, v, mask, dropout) like `minimind.model.layers.sdpa_attention`: q (B, H, T, D), k and
v (B, H_kv, S, D), the layer's mask (None = causal over the new tokens) -> (B, H, T, D). The trainer or the
Engine installs one on a model's attention layers at set-up (`minimind.kernels.use_kernels`); each is tested
equal to SDPA (tests/test_causal_blocks.py, test_documents.py, test_perf_paths.py).
"""

from __future__ import annotations

import math

import torch

from minimind.kernels.causal_blocks import causal_block_attention, use_causal_blocks
from minimind.kernels.documents import Documents
from minimind.model.layers import Attention, sdpa_attention


def causal_blocks_attention(module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask, dropout: float) -> torch.Tensor:
    """CPU training: causal self-attention in GEMM blocks (causal_blocks.py) at the lengths where they beat SDPA,
    per-document attention for packed rows (`Documents`, each document through the same choice), SDPA otherwise
    (inference under no_grad, other lengths, a cache prefix, a mask)."""
    if isinstance(mask, Documents):
        return mask.attend(q, k, v, lambda qd, kd, vd: causal_blocks_attention(module, qd, kd, vd, None, dropout))
    if mask is None and q.shape[2] > 1 and use_causal_blocks(q, k, dropout):
        return causal_block_attention(q, k, v)
    return sdpa_attention(module, q, k, v, mask, dropout)


def one_query_matmul_attention(module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """Eager bf16/fp16 decoding on CPU: one new token per row attends over the cache with two matmuls (SDPA for
    longer inputs such as prompts).

    PyTorch's CPU flash-attention kernel at one query is several times slower in bf16 than in float32; two
    matmuls are not (docs/performance.md). In float32 the two measured the same, so float32 keeps SDPA. The
    query heads that share a K/V head are one matmul's rows, so nothing is repeated or copied.
    mask: None or bool (B, 1, 1, S).
    """
    if q.shape[2] != 1:
        return sdpa_attention(module, q, k, v, mask, dropout)
    b, _, _, d = q.shape
    q = q.reshape(b, module.n_kv_heads, module.n_rep, d)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (B, n_kv_heads, n_rep, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return (probs @ v).view(b, module.n_heads, 1, d)


def one_query_kernel_attention(module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """Float32 decoding on a CPU with the row kernels (int_gemv.py): one new token per row attends over its cache
    through `one_query_attention`, which reads each key and value once for the query heads sharing it (PyTorch's
    SDPA at one query costs several times its arithmetic; docs/performance.md, rollout section); SDPA for
    several tokens (prompts), other dtypes, head sizes the kernel does not take, and any other mask.
    mask: None (every column of k) or bool (B, 1, 1, S) over the first S columns of k.
    """
    if (q.shape[2] == 1 and dropout == 0 and q.dtype == torch.float32 and module.head_dim % 16 == 0
            and module.head_dim <= 256 and (mask is None or (mask.dtype == torch.bool and mask.shape[:3] == (q.shape[0], 1, 1)))):
        return torch.ops.minimind.one_query_attention(q, k, v, mask)
    return sdpa_attention(module, q, k, v, mask, dropout)


def one_query(module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row over the cache (B, n_kv_heads, S, D), as products and sums.

    Under torch.compile these fuse into the decode step's generated loops, where an SDPA call per layer costs
    more than its arithmetic at one query. The query heads that share a K/V head sit side by side, so nothing is
    copied. The mask's width (B, 1, 1, S) says how many cache columns to read: the compiled step passes the
    whole cache and a mask as wide as the tokens so far.
    """
    b, _, _, d = q.shape
    k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
    q = q.view(b, module.n_kv_heads, module.n_rep, 1, d)
    scores = (q * k[:, :, None]).sum(-1) / math.sqrt(d)  # (B, n_kv_heads, n_rep, S)
    probs = scores.masked_fill(~mask, float("-inf")).float().softmax(dim=-1).to(q.dtype)  # mask (B, 1, 1, S)
    return (probs[..., None] * v[:, :, None]).sum(-2).view(b, module.n_heads, 1, d)


def inline_one_query_attention(module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """The compiled decode step's attention (infer/compiled.py): `one_query` inside the compiled one-token step;
    the same layers run eagerly for prompts, where SDPA serves. A part of the step Dynamo leaves eager (an MoE
    layer's data-dependent routing breaks the graph, and past its recompile limit a frame runs uncompiled) still
    receives the whole cache and a narrower mask, so a mask narrower than the keys takes `one_query` too."""
    if q.shape[2] == 1 and mask is not None and (torch.compiler.is_compiling() or mask.shape[-1] < k.shape[2]):
        return one_query(module, q, k, v, mask)
    return sdpa_attention(module, q, k, v, mask, dropout)

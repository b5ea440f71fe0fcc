"""The dense building blocks: RMSNorm, rotary embeddings (with YaRN), GQA attention, SwiGLU feed-forward.

Copied into saved model directories as HF remote code: imports only torch and sibling model files.
Tensor layout inside attention follows HF: (batch, heads, seq, head_dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .causal_blocks import causal_block_attention, use_causal_blocks
from .configuration_minimind import MiniMindConfig
from .documents import Documents


def _sdpa_supports_gqa() -> bool:
    """`enable_gqa` lets SDPA read shared K/V heads directly instead of copying them (torch >= 2.5)."""
    q, kv = torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except TypeError:
        return False
    return True


SDPA_HAS_GQA = _sdpa_supports_gqa()


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 for stability and cast back."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype == torch.float32 and torch.is_grad_enabled():
            return _RMSNormFunction.apply(x, self.weight, self.eps)  # training: same values, a shorter backward
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class _RMSNormFunction(torch.autograd.Function):
    """weight * x * r with r = rsqrt(mean(x²) + eps), keeping only x * r and r for a hand-written backward:

        dx = r * (g·w − x·r * mean(g·w * x·r)),   dweight = Σ_rows g * x·r

    Autograd's version of the same forward keeps x as well, and its backward runs about twice as many passes
    over (tokens × dim): this one measured 1.3-1.5x faster per norm (forward + backward, 4 x 512 x 512 fp32 on
    a CPU), and a training step's peak memory 9% lower (docs/performance.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        normed = x * r
        ctx.save_for_backward(normed, r, weight)
        return normed * weight

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, r, weight = ctx.saved_tensors
        scaled = grad * weight
        along = (scaled * normed).mean(-1, keepdim=True)  # the part of the gradient along x, removed below
        dx = torch.addcmul(scaled, normed, along, value=-1).mul_(r) if ctx.needs_input_grad[0] else None
        dweight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return dx, dweight, None


def rope_frequencies(config: MiniMindConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the attention scale for RoPE, with YaRN when enabled.

    YaRN keeps high-frequency dimensions as trained, interpolates low-frequency ones by `yarn_factor`, and
    ramps linearly between them; cos/sin are scaled by 0.1·ln(factor)+1 (the YaRN paper's recipe, same
    numbers as HF's `rope_type="yarn"` so exported Llama directories compute the same function), or by
    `yarn_attention_factor` when set (HF's `attention_factor`; minimind-3 uses 1.0).
    """
    dim, base = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)
    factor = config.yarn_factor
    if factor <= 1.0:
        return inv_freq, 1.0
    original = config.yarn_original_max_seq_len or config.max_seq_len

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(config.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(config.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = extrapolate (as trained), 0 = interpolate (divide by factor)
    inv_freq = (inv_freq / factor) * (1 - keep) + inv_freq * keep
    scale = config.yarn_attention_factor
    return inv_freq, 0.1 * math.log(factor) + 1.0 if scale is None else scale


def rope_cos_sin(
    config: MiniMindConfig, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (B, T, head_dim) for the given positions (B, T).

    Computed per call rather than stored as buffers: it is a few kFLOPs, and it keeps checkpoints free of
    derived state that a meta-device load or a dtype cast could corrupt.
    """
    inv_freq, scale = rope_frequencies(config, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # rotate-half layout: pair dim i with dim i + head_dim/2
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin (..., D) with its first half negated: rotate_half(x) * sin == x.roll(D/2, -1) * signed_sin(sin).

    rotate_half(x) = cat(-x2, x1) is the HF Llama convention (pairs dim i with dim i + D/2).
    """
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor):
    """RoPE on queries (B, H, T, D) and keys (B, H_kv, T, D) at once: x * cos + rotate_half(x) * sin.

    cos and sin_signed (`signed_sin`) are (B, 1, T, D). One rotation over the concatenated heads, with
    rotate_half written as a roll against the sign-folded sin table: the same products and sums as the
    textbook form, in 4 kernels instead of 10 (decoding one token runs this once per layer, where kernel
    launches cost more than the arithmetic).
    """
    n_heads = q.shape[1]
    qk = torch.cat((q, k), dim=1)
    qk = torch.addcmul(qk * cos, qk.roll(qk.shape[-1] // 2, dims=-1), sin_signed)
    return qk[:, :n_heads], qk[:, n_heads:]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv_heads, T, D) -> (B, n_kv_heads * n_rep, T, D); only used where SDPA cannot do GQA itself."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.n_rep = self.n_heads // self.n_kv_heads
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        if config.qk_norm:  # one RMSNorm(head_dim) shared by all query heads, one by all key heads (Qwen3's)
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.flash = config.flash_attn
        # Set by `CompiledDecoder` (infer/compiled.py): a compiled one-token step writes attention out.
        self.inline_one_query = False

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        mask: torch.Tensor | None,
        cache=None,
    ) -> torch.Tensor:
        """x (B, T, dim); cos and `signed_sin` tables (B, 1, T, head_dim); mask: None (plain causal over the
        new tokens), bool (B|1, 1, T, S) with True = attend, or the `Documents` of a packed batch."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # QK-norm over each head's (head_dim,) vector, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate_qk(q, k, cos, sin_signed)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, n_kv_heads, S, D) with S = past + t
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, Documents):  # packed rows: each document attends alone (documents.py)
            out = mask.attend(q, k, v, lambda qd, kd, vd: self._sdpa(qd, kd, vd, None, dropout))
        elif self.inline_one_query and t == 1 and mask is not None and torch.compiler.is_compiling():
            out = self._one_query(q, k, v, mask)
        elif t == 1 and q.device.type == "cpu" and q.dtype != torch.float32 and not self.training:
            out = self._one_query_matmul(q, k, v, mask)
        elif self.flash:
            out = self._sdpa(q, k, v, mask, dropout)
        else:
            out = self._explicit(q, k, v, mask, dropout)
        out = self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        return self.resid_dropout(out) if dropout else out

    def _sdpa(self, q, k, v, mask, dropout):
        # A plain causal mask is only valid when queries and keys are the same positions (no cache prefix).
        causal = mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
        if causal and use_causal_blocks(q, k, dropout):  # fp32 on a CPU: GEMM blocks beat SDPA's kernel
            return causal_block_attention(q, k, v)
        if SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=self.n_rep > 1
            )
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)

    def _one_query(self, q, k, v, mask):
        """Attention of one new token per row over the cache (B, n_kv_heads, S, D), as products and sums.

        Under torch.compile these fuse into the decode step's generated loops, where an SDPA call per layer
        costs more than its arithmetic at one query (~26 us each on a CPU). The query heads that share a K/V
        head sit side by side, so nothing is copied. The mask's width says how many cache columns to read: the
        compiled step passes the whole cache and a mask as wide as the tokens so far.
        """
        b, _, _, d = q.shape
        k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        q = q.view(b, self.n_kv_heads, self.n_rep, 1, d)
        scores = (q * k[:, :, None]).sum(-1) / math.sqrt(d)  # (B, n_kv_heads, n_rep, S)
        probs = scores.masked_fill(~mask, float("-inf")).float().softmax(dim=-1).to(q.dtype)  # mask (B, 1, 1, S)
        return (probs[..., None] * v[:, :, None]).sum(-2).view(b, self.n_heads, 1, d)

    def _one_query_matmul(self, q, k, v, mask):
        """Eager bf16/fp16 decoding on CPU: one new token per row attends over the cache with two matmuls.

        PyTorch's CPU flash-attention kernel at one query takes 4.5-10x its float32 time in bf16; this takes
        1.1-1.4x (docs/performance.md). In float32 the two measured the same, so float32 keeps SDPA. The query
        heads that share a K/V head are one matmul's rows, so nothing is repeated or copied.
        mask: None or bool (B, 1, 1, S).
        """
        b, _, _, d = q.shape
        q = q.reshape(b, self.n_kv_heads, self.n_rep, d)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (B, n_kv_heads, n_rep, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        return (probs @ v).view(b, self.n_heads, 1, d)

    def _explicit(self, q, k, v, mask, dropout):
        """The same attention written out, for readers and for backends without SDPA."""
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, S)
        if mask is None and q.shape[2] > 1:
            t, s = q.shape[2], k.shape[2]
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.dropout(scores.float().softmax(dim=-1).to(q.dtype), p=dropout, training=dropout > 0)
        return probs @ v


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: MiniMindConfig, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or config.hidden_dim
        self.gate_proj = nn.Linear(config.dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, config.dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.dropout(out) if self.training and self.dropout.p else out

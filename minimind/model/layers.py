"""The dense building blocks: RMSNorm, rotary embeddings (with YaRN), GQA attention, SwiGLU feed-forward.

Copied into saved model directories as HF remote code: imports only torch and sibling model files.
Tensor layout inside attention follows HF: (batch, heads, seq, head_dim).

Attention and RMSNorm call an implementation chosen once, when the module is built (SDPA, or the written-out
form when `flash_attn` is off) or later by whoever sets the model up (the trainer, the Engine): the faster
kernels for CPU training and decoding live in `minimind.kernels` and are installed with
`minimind.kernels.use_kernels`. Nothing here looks at the device, dtype or training state to pick one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_minimind import MiniMindConfig


def _sdpa_supports_gqa() -> bool:
    """`enable_gqa` lets SDPA read shared K/V heads directly instead of copying them (torch >= 2.5)."""
    q, kv = torch.zeros(1, 2, 1, 2), torch.zeros(1, 1, 1, 2)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except TypeError:
        return False
    return True


SDPA_HAS_GQA = _sdpa_supports_gqa()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x²) + eps) over the last dimension, in float32 and cast back to x's dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 for stability and cast back."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.norm_function = rms_norm  # (x, weight, eps) -> normed x; minimind.kernels may install another

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_function(x, self.weight, self.eps)


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


def sdpa_attention(module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention: q (B, H, T, D), k and v (B, H_kv, S, D) -> (B, H, T, D).

    mask None means causal over the new tokens, which is only SDPA's `is_causal` when there is no cache prefix.
    """
    causal = mask is None and q.shape[2] == k.shape[2] and q.shape[2] > 1
    if SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=module.n_rep > 1
        )
    k, v = repeat_kv(k, module.n_rep), repeat_kv(v, module.n_rep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


def eager_attention(module: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """The same attention written out, for readers and for backends without SDPA."""
    k, v = repeat_kv(k, module.n_rep), repeat_kv(v, module.n_rep)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(module.head_dim)  # (B, H, T, S)
    if mask is None and q.shape[2] > 1:
        t, s = q.shape[2], k.shape[2]
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.float().softmax(dim=-1).to(q.dtype), p=dropout, training=dropout > 0)
    return probs @ v


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
        # (module, q, k, v, mask, dropout) -> (B, H, T, D); minimind.kernels may install another.
        self.attention_function = sdpa_attention if config.flash_attn else eager_attention

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        mask: torch.Tensor | None,
        cache=None,
    ) -> torch.Tensor:
        """x (B, T, dim); cos and `signed_sin` tables (B, 1, T, head_dim); mask: None (plain causal over the
        new tokens), bool (B|1, 1, T, S) with True = attend, or what the body's `document_attention` made of a
        packed batch's document ids (by default their block-diagonal mask)."""
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
        out = self.attention_function(self, q, k, v, mask, dropout)
        out = self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        return self.resid_dropout(out) if dropout else out


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

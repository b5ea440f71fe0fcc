"""MiniMindConfig: the model's shape, with MiniMind2's field names and the HF aliases HF tooling reads.

This file is copied into every saved model directory (HF remote code), so it imports only torch/transformers.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

# The named presets (README's model table). `tiny` is sized for the CPU demo and tests (a few M parameters).
PRESETS: dict[str, dict] = {
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, max_seq_len=1024),
    "small": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2),
    "base": dict(dim=768, n_layers=16, n_heads=8, n_kv_heads=2),
    "moe": dict(
        dim=640, n_layers=8, n_heads=8, n_kv_heads=2, use_moe=True,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    ),
    # Today's MiniMind (minimind-3, aligned with Qwen3): QK-norm, head_dim 96, FFN ceil(768·π/64)·64 = 2432,
    # θ = 1e6, eps 1e-6, 32k positions. The MoE variant has 4 routed experts of the same width, top-1 with the
    # top-k weights renormalised (so the chosen expert's weight is 1, as Qwen3-MoE computes it), no shared
    # expert, aux coefficient 5e-4.
    "minimind3": dict(
        dim=768, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=96, hidden_dim=2432, vocab_size=6400,
        qk_norm=True, rope_theta=1e6, norm_eps=1e-6, max_seq_len=32768,
    ),
    "minimind3-moe": dict(
        dim=768, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=96, hidden_dim=2432, vocab_size=6400,
        qk_norm=True, rope_theta=1e6, norm_eps=1e-6, max_seq_len=32768,
        use_moe=True, n_routed_experts=4, num_experts_per_tok=1, n_shared_experts=0,
        norm_topk_prob=True, norm_top1_prob=True, aux_loss_alpha=5e-4,
    ),
}


def default_hidden_dim(dim: int) -> int:
    """MiniMind2's SwiGLU width: 8·dim/3 rounded up to a multiple of 64."""
    return 64 * math.ceil(int(8 * dim / 3) / 64)


class MiniMindConfig(PretrainedConfig):
    """Configuration of a MiniMind decoder-only transformer (dense or MoE).

    Field names follow MiniMind2 (`dim`, `n_layers`, ...); `attribute_map` makes the usual HF names
    (`hidden_size`, `num_hidden_layers`, ...) read and write the same values.
    """

    model_type = "minimind"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "hidden_dim",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
        "num_experts": "n_routed_experts",
        "router_aux_loss_coef": "aux_loss_alpha",
    }

    def __init__(
        self,
        dim: int = 512,
        n_layers: int = 8,
        n_heads: int = 8,
        n_kv_heads: int = 2,
        vocab_size: int = 6400,
        hidden_dim: int | None = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        max_seq_len: int = 8192,
        norm_eps: float = 1e-5,
        rope_theta: float = 1e6,
        dropout: float = 0.0,
        flash_attn: bool = True,
        use_moe: bool = False,
        n_routed_experts: int = 4,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 1,
        moe_intermediate_size: int | None = None,
        aux_loss_alpha: float = 0.1,
        seq_aux: bool = True,
        norm_topk_prob: bool = True,
        norm_top1_prob: bool | None = None,
        yarn_factor: float = 1.0,
        yarn_original_max_seq_len: int | None = None,
        yarn_beta_fast: float = 32.0,
        yarn_beta_slow: float = 1.0,
        yarn_attention_factor: float | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        # HF names passed as arguments win over the defaults (attribute_map only covers attribute access).
        dim = kwargs.pop("hidden_size", dim)
        n_layers = kwargs.pop("num_hidden_layers", n_layers)
        n_heads = kwargs.pop("num_attention_heads", n_heads)
        n_kv_heads = kwargs.pop("num_key_value_heads", n_kv_heads)
        hidden_dim = kwargs.pop("intermediate_size", hidden_dim)
        max_seq_len = kwargs.pop("max_position_embeddings", max_seq_len)
        norm_eps = kwargs.pop("rms_norm_eps", norm_eps)
        n_routed_experts = kwargs.pop("num_experts", n_routed_experts)
        aux_loss_alpha = kwargs.pop("router_aux_loss_coef", aux_loss_alpha)
        self.dim = dim
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.vocab_size = vocab_size
        self.hidden_dim = hidden_dim if hidden_dim is not None else default_hidden_dim(dim)
        # Per-head width; configs written before it was a field (no `head_dim` key) get dim / n_heads, as then.
        self.head_dim = head_dim  # None until validated, then dim // n_heads (see below)
        # QK-norm (minimind-3, Qwen3): an RMSNorm of size head_dim over each head of q and of k, after the
        # projections and before RoPE, with eps = norm_eps.
        self.qk_norm = qk_norm
        self.max_seq_len = max_seq_len
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.dropout = dropout
        self.flash_attn = flash_attn
        self.use_moe = use_moe
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts  # 0 = routed experts only (minimind-3, Qwen3-MoE)
        # Width of each routed expert; None = hidden_dim (shared experts keep hidden_dim).
        self.moe_intermediate_size = moe_intermediate_size if moe_intermediate_size is not None else self.hidden_dim
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux  # True: sequence-level load-balancing loss; False: token-level
        self.norm_topk_prob = norm_topk_prob
        # Whether `norm_topk_prob` also applies at top-1, where renormalising makes the one weight exactly 1
        # (Qwen3-MoE and minimind-3 compute it so). MiniMind2-era code renormalised only for top_k > 1, scaling a
        # top-1 expert's output by its router probability; configs saved then lack this field (and `qk_norm`),
        # so None follows `qk_norm`: old directories keep their numbers, QK-norm (minimind-3) models renormalise.
        self.norm_top1_prob = bool(qk_norm) if norm_top1_prob is None else norm_top1_prob
        # YaRN RoPE scaling for inference beyond the trained length; factor 1.0 means off.
        self.yarn_factor = yarn_factor
        self.yarn_original_max_seq_len = yarn_original_max_seq_len
        self.yarn_beta_fast = yarn_beta_fast
        self.yarn_beta_slow = yarn_beta_slow
        # cos/sin scale under YaRN; None = 0.1·ln(factor)+1 (the YaRN paper's, HF's default). minimind-3 uses 1.0.
        self.yarn_attention_factor = yarn_attention_factor
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.validate()  # before transformers' own checks, which fail on bad values with less clear errors
        if self.head_dim is None:  # configs written before head_dim was a field: dim / n_heads, as then
            self.head_dim = self.dim // self.n_heads
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def renormalises_top_k(self) -> bool:
        """Whether the router rescales the chosen experts' weights to sum to 1 (at top-1: to exactly 1)."""
        return self.norm_topk_prob and (self.num_experts_per_tok > 1 or self.norm_top1_prob)

    def to_dict(self) -> dict:
        """The fields as config.json stores them: `head_dim` only where it is not dim / n_heads, so directories
        of models without their own head size keep the file they always had (and an edited `n_heads` is checked
        against `dim` as before)."""
        data = super().to_dict()
        if self.n_heads * self.head_dim == self.dim:
            data.pop("head_dim", None)
        return data

    def validate(self) -> None:
        """Raise ValueError with one clear sentence if the shape cannot build a model."""
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len",
                    "moe_intermediate_size")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field '{field}' must be a positive integer, got {value!r}")
        numbers = ("norm_eps", "rope_theta", "dropout", "yarn_factor", "aux_loss_alpha", "initializer_range")
        for field in numbers:
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"config field '{field}' must be a number, got {value!r}")
        for field in ("use_moe", "flash_attn", "seq_aux", "norm_topk_prob", "norm_top1_prob", "qk_norm"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"config field '{field}' must be true or false, got {getattr(self, field)!r}")
        head_dim = self.head_dim
        if head_dim is None:  # derived from dim, which the heads must then divide
            if self.dim % self.n_heads:
                raise ValueError(f"config field 'n_heads' ({self.n_heads}) must divide 'dim' ({self.dim})")
            head_dim = self.dim // self.n_heads
        elif not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim <= 0:
            raise ValueError(f"config field 'head_dim' must be a positive integer, got {head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"config field 'n_kv_heads' ({self.n_kv_heads}) must divide 'n_heads' ({self.n_heads})"
            )
        if head_dim % 2:
            raise ValueError(f"config field 'head_dim' ({head_dim}; dim/n_heads unless given) must be even for RoPE")
        moe_counts = ("n_routed_experts", "num_experts_per_tok", "n_shared_experts")
        for field in moe_counts if self.use_moe else ():
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"config field '{field}' must be a non-negative integer, got {value!r}")
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(
                f"config field 'num_experts_per_tok' ({self.num_experts_per_tok}) must be between 1 and "
                f"'n_routed_experts' ({self.n_routed_experts})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config field 'dropout' must be in [0, 1), got {self.dropout}")
        factor = self.yarn_attention_factor
        if factor is not None and (not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0):
            raise ValueError(f"config field 'yarn_attention_factor' must be a positive number or null, got {factor!r}")
        if self.yarn_factor < 1.0:
            raise ValueError(f"config field 'yarn_factor' must be >= 1.0 (1.0 = off), got {self.yarn_factor}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MiniMindConfig:
        """Build a named preset (`tiny`, `small`, `base`, `moe`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def with_yarn(self, factor: float) -> MiniMindConfig:
        """Return a copy that runs at `factor`× the trained context with YaRN RoPE scaling."""
        if factor < 1.0:
            raise ValueError(f"YaRN factor must be >= 1.0, got {factor}")
        data = self.to_dict()
        original = self.yarn_original_max_seq_len or self.max_seq_len
        data.update(yarn_factor=factor, yarn_original_max_seq_len=original, max_seq_len=int(original * factor))
        return type(self)(**data)

"""MiniMindForCausalLM: embedding -> N x [RMSNorm -> GQA attention -> RMSNorm -> SwiGLU or MoE] -> RMSNorm -> tied head.

Follows HF conventions (`PreTrainedModel` + `GenerationMixin`, `forward(input_ids, attention_mask, position_ids,
past_key_values, labels, use_cache)`), so `AutoModelForCausalLM`, `generate`, PEFT and lm-eval work unchanged.
This file and its siblings are copied into every saved model directory (HF remote code): torch/transformers only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, SequenceClassifierOutputWithPast

from .configuration_minimind import MiniMindConfig
from .documents import document_mask, document_positions
from .layers import Attention, FeedForward, RMSNorm, rope_cos_sin, signed_sin
from .moe import MoEFeedForward

# transformers 5 renamed the output field `past_key_values` to `cache`; fill whichever this version declares.
_CACHE_FIELD = "cache" if "cache" in MoeCausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MiniMindBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin_signed, mask, cache=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new hidden states and this block's MoE load-balancing loss (None for a dense block)."""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin_signed, mask, cache)
        if isinstance(self.mlp, MoEFeedForward):
            y, aux = self.mlp(self.post_attention_layernorm(h))
            return h + y, aux
        return h + self.mlp(self.post_attention_layernorm(h)), None


class MiniMindPreTrainedModel(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MiniMindBlock"]
    _supports_sdpa = True
    _supports_cache_class = True


class MiniMindModel(MiniMindPreTrainedModel):
    """The transformer body: token ids -> final hidden states (B, T, dim)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(MiniMindBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.gradient_checkpointing = False
        # document ids (B, T) -> what attention takes for packed rows; minimind.kernels may install another.
        self.document_attention = document_mask
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        document_ids: torch.LongTensor | None = None,
    ) -> tuple[torch.Tensor, Cache | None, torch.Tensor]:
        """Returns (hidden states, cache or None, summed MoE aux loss).

        `document_ids` (B, T) marks packed rows (same id = one document, -1 = padding): each document attends
        only to itself, with positions restarting at 0; it replaces `attention_mask`.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if document_ids is not None:
            if attention_mask is not None or past:
                raise ValueError("document_ids (packed training rows) replaces attention_mask and takes no KV cache")
            if position_ids is None:
                position_ids = document_positions(document_ids)
            mask = self.document_attention(document_ids)
        else:
            if position_ids is None:
                position_ids = default_position_ids(attention_mask, b, t, past, x.device)
            mask = attention_bias(attention_mask, t, past)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)  # (B, T, head_dim)
        cos, sin_signed = cos.unsqueeze(1), signed_sin(sin).unsqueeze(1)  # (B, 1, T, head_dim): over heads
        if self.training and self.dropout.p:
            x = self.dropout(x)
        aux_total = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, aux = checkpoint(layer, x, cos, sin_signed, mask, past_key_values, use_reentrant=False)
            else:
                x, aux = layer(x, cos, sin_signed, mask, past_key_values)
            if aux is not None:
                aux_total = aux_total + aux
        return self.norm(x), past_key_values, aux_total


def default_position_ids(attention_mask, b: int, t: int, past: int, device) -> torch.Tensor:
    """Positions of the new tokens: counted over real tokens only, so a left-padded row starts at 0."""
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -t:]
    return torch.arange(past, past + t, device=device).unsqueeze(0).expand(b, t)


def attention_bias(attention_mask, t: int, past: int) -> torch.Tensor | None:
    """Turn the caller's mask into what attention takes: None for plain causal, else bool (B, 1, t, past+t).

    A 2-D `attention_mask` (B, past+t) marks real tokens with 1 and padding with 0; a 4-D one is used as given
    (True/1 = may attend), e.g. a block-diagonal mask for packed documents.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask.bool()
    keys = attention_mask.bool()
    if bool(keys.all()):
        if t == 1 or past == 0:
            return None  # causal without padding is SDPA's fast path
        keys = None
    s = past + t
    causal = torch.ones(t, s, dtype=torch.bool, device=attention_mask.device).tril(past)
    mask = causal[None, None] if keys is None else causal[None, None] & keys[:, None, None, :s]
    # A left-pad query row can see no key at all; let it see everything so softmax has no NaN (its output
    # is never read: real tokens never attend to pad positions).
    return mask | ~mask.any(dim=-1, keepdim=True)


class MiniMindForCausalLM(MiniMindPreTrainedModel, GenerationMixin):
    """MiniMind with a language-model head tied to the token embedding."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.model = MiniMindModel(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        document_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Logits (B, T, vocab); with `labels` (B, T, -100 = ignore) also the shifted next-token loss (+ MoE aux).

        `logits_to_keep=n` computes logits for the last n positions only (generation needs just the last).
        `cache` is the newer transformers name for `past_key_values`; either works.
        `document_ids` (B, T): packed rows, see `MiniMindModel.forward`. Training losses straight from the hidden
        states (no logits kept) are `minimind.kernels.training.TrainingLM`'s, outside this file.
        """
        past_key_values = past_key_values if past_key_values is not None else cache
        if use_cache is None:
            use_cache = past_key_values is not None or (not self.training and getattr(self.config, "use_cache", True))
        hidden, past_key_values, aux = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            document_ids=document_ids,
        )
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            ) + aux
        return MoeCausalLMOutputWithPast(loss=loss, logits=logits, aux_loss=aux, **{_CACHE_FIELD: past_key_values})


class MiniMindForSequenceClassification(MiniMindPreTrainedModel):
    """MiniMind with a linear score head read at each row's last real token: a reward model (`num_labels` 1), as
    `minimind reward` trains it and `--reward rm:DIR` scores with it."""

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MiniMindModel(config)
        self.score = nn.Linear(config.dim, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        """Scores (B, num_labels) of right-padded rows: the head over the final hidden state of each row's last
        token where `attention_mask` is 1 (the last column without a mask)."""
        hidden, _, _ = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                  inputs_embeds=inputs_embeds)
        b, t = hidden.shape[:2]
        if attention_mask is None:
            last = torch.full((b,), t - 1, device=hidden.device)
        else:  # the highest index holding a real token (right padding; left padding ends at t - 1 anyway)
            positions = torch.arange(t, device=hidden.device).expand(b, t)
            last = torch.where(attention_mask.bool(), positions, 0).amax(-1)
        pooled = hidden[torch.arange(b, device=hidden.device), last]  # (B, dim)
        return SequenceClassifierOutputWithPast(logits=self.score(pooled))


MiniMindConfig.register_for_auto_class()
MiniMindForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MiniMindForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

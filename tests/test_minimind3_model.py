"""The minimind-3 family (QK-norm, MoE without shared experts) against transformers' Qwen3 and Qwen3-MoE."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_model import randomize
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from minimind.model import MiniMindConfig, MiniMindForCausalLM
from minimind.model.info import count_parameters

# Small shapes on the presets' settings; head_dim 24 with 4 heads is not dim / n_heads, as Qwen3 allows.
SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24, hidden_dim=96, vocab_size=256,
             max_seq_len=256)


def tiny3(preset: str = "minimind3", seed: int = 0, **overrides) -> MiniMindForCausalLM:
    """A randomized tiny model of a minimind-3 preset, in eval mode."""
    model = MiniMindForCausalLM(MiniMindConfig.from_preset(preset, **{**SMALL, **overrides})).eval()
    randomize(model, seed)
    return model


def qwen3_config(config: MiniMindConfig) -> dict:
    """The Qwen3 / Qwen3-MoE config fields of the same model."""
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.norm_eps,
        max_position_embeddings=config.max_seq_len, tie_word_embeddings=True, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if config.use_moe:
        fields.update(num_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
                      moe_intermediate_size=config.moe_intermediate_size, norm_topk_prob=config.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=config.aux_loss_alpha)
    return fields


def qwen3_twin(model: MiniMindForCausalLM, tmp_path) -> torch.nn.Module:
    """transformers' own Qwen3 (or Qwen3-MoE) loaded from a checkpoint of our state dict under our names.

    Written to disk and read by `from_pretrained`, so transformers' per-expert → fused-expert mapping for
    Qwen3-MoE checkpoints applies: the names are checked against the format released Qwen3 models use."""
    config = model.config
    cls, config_cls = (Qwen3MoeForCausalLM, Qwen3MoeConfig) if config.use_moe else (Qwen3ForCausalLM, Qwen3Config)
    config_cls(**qwen3_config(config)).save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    twin, info = cls.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return twin.eval()


def test_presets_have_the_exact_parameter_counts():
    for name, exact, active in (("minimind3", 63_912_192, 63_912_192), ("minimind3-moe", 198_416_640, 63_936_768)):
        config = MiniMindConfig.from_preset(name)
        with torch.device("meta"):
            built = sum(p.numel() for p in MiniMindForCausalLM(config).parameters())
        assert built == count_parameters(config).total == exact, name
        assert count_parameters(config).active == active, name


@pytest.mark.parametrize("preset", ["minimind3", "minimind3-moe"])
def test_logits_equal_transformers_qwen3(preset, tmp_path):
    model = tiny3(preset)
    twin = qwen3_twin(model, tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, twin(ids).logits
    assert ours.abs().max() > 1  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

"""Export a QK-norm model directory (minimind-3's architecture) as a plain HF `Qwen3ForCausalLM` or
`Qwen3MoeForCausalLM` directory, which transformers, vLLM and llama.cpp's converter run without remote code.

    minimind convert runs/minimind3 --to qwen3 --out runs/minimind3-qwen3

Qwen3 is our QK-norm decoder exactly: RMSNorm(head_dim) over each head of q and k before rotate-half RoPE, GQA,
SwiGLU, tied output head, no biases; Qwen3-MoE adds a softmax top-k router over routed experts only, with the
chosen weights renormalised when `norm_topk_prob` is set (at any k). Our parameter names are Qwen3's, so the
weights are copied as they are (minus the tied `lm_head.weight`) in the per-expert layout of the released
Qwen3-MoE checkpoints; the work is the config. A model without QK-norm or with shared experts has no Qwen3 form
(`--to llama` writes Llama / Qwen2-MoE instead).
"""

from __future__ import annotations

from pathlib import Path

import torch

from minimind.convert.llama import common_hf_config, export_hf, untied_state
from minimind.convert.minimind3 import require_minimind3_shape
from minimind.model.configuration_minimind import MiniMindConfig
from minimind.model.modeling_minimind import MiniMindForCausalLM


def qwen3_config(config: MiniMindConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json of the equivalent `Qwen3ForCausalLM` (dense) or `Qwen3MoeForCausalLM` (MoE)."""
    fields = {
        **common_hf_config(config, dtype),
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.n_layers,
    }
    if not config.use_moe:
        return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **fields}
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **fields,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_experts": config.n_routed_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        # Qwen3-MoE renormalises at any k; a top-1 model of ours renormalises only with norm_top1_prob.
        "norm_topk_prob": config.renormalises_top_k(),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "output_router_logits": False,
        "router_aux_loss_coef": config.aux_loss_alpha,
    }


def export_qwen3(model_dir: str | Path, out_dir: str | Path) -> str:
    """Write `model_dir` as a plain HF Qwen3 / Qwen3-MoE directory at `out_dir` (weights in their saved dtype,
    the tokenizer copied); returns the architecture written."""

    def describe(model: MiniMindForCausalLM, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
        require_minimind3_shape(model.config, "qwen3")
        return qwen3_config(model.config, dtype), untied_state(model)

    return export_hf(model_dir, out_dir, describe)

"""Our MoE as HF's `Qwen2MoeForCausalLM`: the standard architecture that computes exactly our function.

Our MoE layer: softmax router over E routed SwiGLU experts, top-k, weights renormalised to sum 1
(`norm_topk_prob`, only when k > 1), plus always-on shared SwiGLU experts added *without* a gate, after
plain GQA attention with rotate-half RoPE. What the MoE architectures of transformers 5.24 do instead:

- Mixtral: the same router, but no shared experts.
- Qwen3-MoE, OLMoE, dots1, HunYuan-MoE: RMS-normalise q and k inside attention.
- DeepSeek-V2/V3: multi-head latent attention; V3, GLM-4-MoE and dots1 route with sigmoid + bias.
- Ernie-4.5-MoE: interleaved RoPE, score-correction bias, and renormalisation always on.
- GraniteMoeShared: ungated shared expert, but it always renormalises (top-1 would differ) and needs its
  four scale multipliers pinned to 1; Qwen2-MoE is the more widely served of the two.
- Qwen2-MoE: the same router (softmax, top-k, optional renormalisation) and one shared SwiGLU expert,
  but the shared expert is scaled by sigmoid(w·x), and q/k/v carry biases.

Qwen2-MoE fits exactly with three exact rewrites: the shared-expert gate weight is zero, so the gate is
sigmoid(0) = 0.5, and the shared expert's down projection is doubled (both powers of two, so no rounding);
our S shared experts become one of width S·hidden_dim (a sum of SwiGLUs of the same input is a SwiGLU over
the concatenated rows); the q/k/v biases are zeros. Weights are written in the per-expert layout of the
released Qwen1.5-MoE checkpoints, which vLLM, llama.cpp's converter and every transformers version read.
"""

from __future__ import annotations

import torch

from minimind.convert.llama import common_hf_config
from minimind.model.configuration_minimind import MiniMindConfig
from minimind.model.modeling_minimind import MiniMindForCausalLM


def shared_width(config: MiniMindConfig) -> int:
    """Width of the merged shared expert; a model without shared experts gets one all-zero unit (adds 0)."""
    return config.n_shared_experts * config.hidden_dim or 1


def qwen2_moe_config(config: MiniMindConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json of the equivalent `Qwen2MoeForCausalLM`."""
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        **common_hf_config(config, dtype),
        "moe_intermediate_size": config.moe_intermediate_size,
        "shared_expert_intermediate_size": shared_width(config),
        "num_experts": config.n_routed_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        # We renormalise at top-1 only with norm_top1_prob (else top-1 keeps the raw probability); Qwen2-MoE
        # renormalises any k.
        "norm_topk_prob": config.renormalises_top_k(),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "qkv_bias": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.n_layers,
        "output_router_logits": False,
        "router_aux_loss_coef": config.aux_loss_alpha,
    }


def qwen2_moe_state_dict(model: MiniMindForCausalLM) -> dict[str, torch.Tensor]:
    """Our MoE weights renamed and rewritten (zero biases, zero shared gate, doubled shared down_proj)."""
    config = model.config
    ours = model.state_dict()
    state = {name: ours[name] for name in ("model.embed_tokens.weight", "model.norm.weight")}
    width = shared_width(config)
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj", "mlp.gate"):
            state[p + name + ".weight"] = ours[p + name + ".weight"]
        for name in ("q_proj", "k_proj", "v_proj"):
            weight = ours[f"{p}self_attn.{name}.weight"]
            state[f"{p}self_attn.{name}.weight"] = weight
            state[f"{p}self_attn.{name}.bias"] = weight.new_zeros(weight.shape[0])
        for e in range(config.n_routed_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                state[f"{p}mlp.experts.{e}.{proj}.weight"] = ours[f"{p}mlp.experts.{e}.{proj}.weight"]
        shared = [f"{p}mlp.shared_experts.{s}." for s in range(config.n_shared_experts)]
        embed = ours["model.embed_tokens.weight"]
        if shared:
            gate = torch.cat([ours[s + "gate_proj.weight"] for s in shared])  # (S·hidden, dim)
            up = torch.cat([ours[s + "up_proj.weight"] for s in shared])
            down = torch.cat([ours[s + "down_proj.weight"] for s in shared], dim=1) * 2  # (dim, S·hidden)
        else:
            gate = up = embed.new_zeros(width, config.dim)
            down = embed.new_zeros(config.dim, width)
        state[f"{p}mlp.shared_expert.gate_proj.weight"] = gate
        state[f"{p}mlp.shared_expert.up_proj.weight"] = up
        state[f"{p}mlp.shared_expert.down_proj.weight"] = down
        state[f"{p}mlp.shared_expert_gate.weight"] = embed.new_zeros(1, config.dim)
    return state

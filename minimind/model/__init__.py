"""The model: config + presets, layers, MoE, and the HF-compatible causal LM."""

from minimind.model.configuration_minimind import PRESETS, MiniMindConfig
from minimind.model.modeling_minimind import MiniMindForCausalLM, MiniMindModel

__all__ = ["PRESETS", "MiniMindConfig", "MiniMindForCausalLM", "MiniMindModel"]

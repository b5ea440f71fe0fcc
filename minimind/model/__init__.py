"""The model: config + presets, layers, MoE, and the HF-compatible causal LM."""

from minimind.model.configuration_minimind import PRESETS, MiniMindConfig
from minimind.model.modeling_minimind import (
    MiniMindForCausalLM,
    MiniMindForSequenceClassification,
    MiniMindModel,
)

__all__ = ["PRESETS", "MiniMindConfig", "MiniMindForCausalLM", "MiniMindForSequenceClassification", "MiniMindModel"]


def _register_auto_classes() -> None:
    """Let AutoConfig/AutoModelForCausalLM open our directories without trust_remote_code once we are imported."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        AutoConfig.register("minimind", MiniMindConfig)
        AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM)
        AutoModelForSequenceClassification.register(MiniMindConfig, MiniMindForSequenceClassification)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto_classes()

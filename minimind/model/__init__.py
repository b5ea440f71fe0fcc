"""The model: config + presets, layers, MoE, and the HF-compatible causal LM."""

from minimind.model.configuration_minimind import PRESETS, MiniMindConfig
from minimind.model.modeling_minimind import MiniMindForCausalLM, MiniMindModel

__all__ = ["PRESETS", "MiniMindConfig", "MiniMindForCausalLM", "MiniMindModel"]


def _register_auto_classes() -> None:
    """Let AutoConfig/AutoModelForCausalLM open our directories without trust_remote_code once we are imported."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("minimind", MiniMindConfig)
        AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto_classes()

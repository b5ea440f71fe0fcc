"""MiniMind: train a small chat LLM from scratch and run it.

    from minimind import MiniMindConfig, MiniMindForCausalLM, Engine
"""

from minimind.model.configuration_minimind import MiniMindConfig
from minimind.model.modeling_minimind import MiniMindForCausalLM

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "Engine"]
__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Let AutoConfig/AutoModelForCausalLM open our directories without trust_remote_code once we are imported."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("minimind", MiniMindConfig)
        AutoModelForCausalLM.register(MiniMindConfig, MiniMindForCausalLM)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto_classes()


def __getattr__(name: str):
    # The engine pulls in inference code; import it only when asked for.
    if name == "Engine":
        from minimind.infer.engine import Engine

        return Engine
    raise AttributeError(f"module 'minimind' has no attribute {name!r}")

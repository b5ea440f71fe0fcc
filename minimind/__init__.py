"""MiniMind: train a small chat LLM from scratch and run it.

    from minimind import MiniMindConfig, MiniMindForCausalLM, Engine

Names are imported on first use, so `minimind --help` and light verbs do not pay for torch/transformers.
"""

__all__ = ["MiniMindConfig", "MiniMindForCausalLM", "Engine"]
__version__ = "0.1.0"

_LAZY = {
    "MiniMindConfig": "minimind.model",
    "MiniMindForCausalLM": "minimind.model",
    "Engine": "minimind.infer.engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minimind' has no attribute {name!r}")

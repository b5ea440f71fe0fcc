"""Inference: the Engine (prefill + KV-cache decode, sampling, stop rules, streaming, continuous batching)."""

from minimind.infer.engine import Completion, Engine, GenerationStats, StepOutput
from minimind.infer.sampling import SamplingParams

__all__ = ["Completion", "Engine", "GenerationStats", "SamplingParams", "StepOutput"]

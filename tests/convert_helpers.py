"""Helpers shared by the convert tests: model directories with weights large enough to test every term."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import tiny_model

from minimind.model import MiniMindForCausalLM
from minimind.modeldir import save_model_dir


def randomize(model: torch.nn.Module, seed: int = 0) -> MiniMindForCausalLM:
    """Weights far from the init (norm weights around 1), so a wrong permutation or a dropped term shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model


def random_model_dir(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    """Save a tiny model with random weights (config overrides as in `tiny_config`) and the test tokenizer."""
    model = randomize(tiny_model(seed, **overrides), seed)
    return save_model_dir(model, tokenizer, path)


def random_ids(n: int = 2, t: int = 12, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minimind", *map(str, args)], capture_output=True, text=True)

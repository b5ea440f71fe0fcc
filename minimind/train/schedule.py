"""Learning-rate schedule: optional linear warmup, then cosine decay from lr to lr/10."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, lr: float, warmup_steps: int = 0, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly to `lr` over the first `warmup_steps` steps (step 0 already learns: lr/warmup);
    the rest follows min_lr + ½(lr − min_lr)(1 + cos(π·t)), t going 0 → 1, with min_lr = lr·min_ratio.
    """
    min_lr = lr * min_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))

"""The learning-rate schedule both trainers use: linear warm-up, then cosine decay; and checkpoint spacing."""

from __future__ import annotations

import math

WARMUP_FRACTION = 0.1  # tiny budgets: warm-up takes at most this share of the steps


def schedule(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine to `min_lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def effective_warmup(warmup: int, total_steps: int) -> int:
    """Warm-up clamped to WARMUP_FRACTION of the run (40 warm-up steps in a 50-step run would never decay)."""
    return max(0, min(warmup, int(total_steps * WARMUP_FRACTION)))


def default_save_every(total_steps: int) -> int:
    """About 10 checkpoints a run, but not more often than every 25 steps nor rarer than every 1000."""
    return min(1000, max(25, total_steps // 10))

"""The learning-rate schedule of every trainer: linear warm-up, then constant or cosine decay to 10%."""

from __future__ import annotations

import math

import torch


def learning_rate(step: int, *, base: float, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine to 10%."""
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    return base


def set_learning_rates(optimizers: list[tuple[torch.optim.Optimizer, float]], step: int, *, warmup_steps: int,
                       max_steps: int, schedule: str) -> None:
    """Set every param group of each `(optimizer, peak lr)` pair to its learning rate at `step`."""
    for optimizer, base in optimizers:
        lr = learning_rate(step, base=base, warmup_steps=warmup_steps, max_steps=max_steps, schedule=schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr


__all__ = ["learning_rate", "set_learning_rates"]

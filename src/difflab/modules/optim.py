"""Learning-rate schedules used from config."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 5000) -> LambdaLR:
    """lr · min(1, (step + 1)/warmup_steps): DDPM's 5000-step linear warmup, then constant."""
    if warmup_steps < 0:
        raise ValueError(f"model.lr_scheduler.warmup_steps={warmup_steps}: expected >= 0")
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))

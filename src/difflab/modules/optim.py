"""Optimizer helpers: the learning-rate warm-up used from config, gradient clipping for fused optimizers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.optim.lr_scheduler import LambdaLR

# torch's messages for invalid optimizer arguments → the argument (key under model.optimizer) they are about
_ARGUMENT_WORDS = {"learning rate": "lr", "beta": "betas", "epsilon": "eps", "weight_decay": "weight_decay"}


def check_optimizer(optimizer: Any, key: str = "model.optimizer") -> None:
    """Build the optimizer factory once on a dummy parameter, so that an invalid argument (a negative learning
    rate, betas outside [0, 1), ...) fails when the model is built, naming the config key, instead of inside torch
    when training starts."""
    try:
        optimizer([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        message = str(err)
        argument = next((arg for word, arg in _ARGUMENT_WORDS.items() if word in message.lower()), None)
        where = f"{key}.{argument}" if argument else key
        raise ValueError(f"{where}: {message}") from err


def linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int = 5000) -> LambdaLR:
    """lr · min(1, (step + 1)/warmup_steps): DDPM's 5000-step linear warmup, then constant."""
    if warmup_steps < 0:
        raise ValueError(f"model.lr_scheduler.warmup_steps={warmup_steps}: expected >= 0")
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))


def clips_itself(optimizer: Any, precision: str) -> bool:
    """Whether we, not Lightning's precision plugin, must clip the gradients of ``optimizer`` under ``precision``.

    Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales inside ``step()`` (fused
    Adam/AdamW: ``_step_supports_amp_scaling``), also under ``bf16-mixed``, where no GradScaler exists and the
    gradients are the true ones. There the module clips through the base ``Precision.clip_gradients``, the
    code the plugin runs after its check. Under ``16-mixed`` the gradients are still scaled at that point:
    Lightning's own error stays.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # through LightningOptimizer
    return bool(getattr(inner, "_step_supports_amp_scaling", False)) and precision != "16-mixed"


def clip_gradients(
    module: pl.LightningModule, optimizer: Any, gradient_clip_val: float | None, gradient_clip_algorithm: str | None
) -> None:
    """``module.clip_gradients``, also for a fused optimizer under ``bf16-mixed`` (see :func:`clips_itself`)."""
    if gradient_clip_val and clips_itself(optimizer, module.trainer.precision):
        # Lightning's own clipping, without the mixed-precision plugin's refusal
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
        Precision.clip_gradients(module.trainer.precision_plugin, optimizer, gradient_clip_val, algorithm)
        return
    module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

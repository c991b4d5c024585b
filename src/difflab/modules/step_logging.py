"""Logging a training step's scalars without reading them back to the host every step.

Lightning converts every ``prog_bar=True`` step metric to a Python number after each batch (``.item()``), whether a
progress bar is shown or not: on a GPU that is a host-device synchronisation per training step, which drains the
launch queue (Lightning issue #20995). A logger-only step metric is read back only on the trainer's
``log_every_n_steps``, and an epoch metric is summed on the device and read back once per epoch.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def log_train_step(
    module: pl.LightningModule, name: str, value: torch.Tensor, batch_size: int, bar: str | None = None
) -> None:
    """``name`` to the logger every ``trainer.log_every_n_steps`` steps; with ``bar``, the epoch's mean of ``value``
    in the progress bar under that name (shown from the end of the first epoch on)."""
    value = value.detach()
    module.log(name, value, on_step=True, on_epoch=False)
    if bar is not None:
        module.log(bar, value, on_step=False, on_epoch=True, prog_bar=True, logger=False, batch_size=batch_size)

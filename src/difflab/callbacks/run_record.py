"""Writes what sampling and resuming need into every checkpoint, under ``checkpoint["difflab"]``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

import difflab
from difflab.utils.loggers import logger_identity


class RunRecord(pl.Callback):
    """Store the resolved run config and the logger identities (for ``ckpt_path=`` resume) in checkpoints.

    The record is plain containers (the config from ``OmegaConf.to_container``), so checkpoints open with
    ``torch.load(weights_only=True)``. After each save the loggers are flushed (at the next batch, once the metrics
    of the saved step are logged), so the metric history up to a checkpoint is on disk if the run is killed later:
    a resumed run continues it without a gap.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._flush = False

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["difflab"] = {
            "version": difflab.__version__,
            "config": self.config,
            "loggers": [logger_identity(logger) for logger in trainer.loggers],
        }
        self._flush = True

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._flush:
            for logger in trainer.loggers:
                logger.save()
            self._flush = False

"""Writes what sampling and resuming need into every checkpoint, under ``checkpoint["difflab"]``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

import difflab
from difflab.utils.loggers import logger_identity


class RunRecord(pl.Callback):
    """Store the resolved run config and the logger identities (for ``ckpt_path=`` resume) in checkpoints.

    The record is plain containers (the config from ``OmegaConf.to_container``), so checkpoints open with
    ``torch.load(weights_only=True)``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["difflab"] = {
            "version": difflab.__version__,
            "config": self.config,
            "loggers": [logger_identity(logger) for logger in trainer.loggers],
        }

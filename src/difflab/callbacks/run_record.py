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

    A checkpoint written at a training step (``every_n_train_steps``) is saved in ``on_train_batch_end``, *before*
    Lightning hands that step's metrics to the loggers: a kill right after the save would lose the row for good
    (the resumed run starts at the next step). The record then also holds that row (``unlogged_row``: step and
    values), and a resumed CSV logger writes it when its file lacks it (:func:`difflab.utils.loggers.
    resume_logger_kwargs`).
    """

    def __init__(self, config: dict[str, Any], choices: dict[str, Any] | None = None) -> None:
        self.config, self.choices = config, choices
        self._in_batch_end = False  # between on_train_batch_end and the loggers' update of that step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self._in_batch_end = True  # our hook runs before ModelCheckpoint's (Lightning puts checkpoints last)

    def on_train_batch_start(self, *args: Any) -> None:
        self._in_batch_end = False

    def on_validation_start(self, *args: Any) -> None:
        self._in_batch_end = False

    def on_train_epoch_end(self, *args: Any) -> None:
        self._in_batch_end = False

    def unlogged_row(self, trainer: pl.Trainer) -> dict[str, Any] | None:
        """The metrics row of this training step, when a checkpoint is saved before Lightning logs it."""
        connector = trainer._logger_connector
        if not (self._in_batch_end and (connector.should_update_logs or trainer.fast_dev_run)):
            return None
        values = {k: float(v) for k, v in connector.metrics["log"].items()}
        values.setdefault("epoch", float(trainer.current_epoch))  # as Lightning's log_metrics adds it
        return {"step": int(trainer.fit_loop.epoch_loop._batches_that_stepped), "metrics": values}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["difflab"] = {
            "version": difflab.__version__,
            "config": self.config,
            "loggers": [logger_identity(logger) for logger in trainer.loggers],
        }
        if self.choices is not None:  # the config groups that made the config: a resume takes them (tasks.resume)
            checkpoint["difflab"]["choices"] = dict(self.choices)
        row = self.unlogged_row(trainer)
        if row is not None:
            checkpoint["difflab"]["unlogged_row"] = row

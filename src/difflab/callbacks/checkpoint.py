"""Lightning's ModelCheckpoint, plus a save of the final training state when fit stops between checkpoints, last.ckpt
written first, and a clear error when a checkpoint cannot be written."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, permissions, ...); the files already there are unchanged."""


def fit_is_stopping(trainer: pl.Trainer) -> bool:
    """True in ``on_train_epoch_end`` of the last epoch ``Trainer.fit`` will run.

    Mirrors ``FitLoop.done`` (which cannot be called here: it logs "fit stopped" as a side effect): ``max_steps``
    reached, ``max_epochs`` reached (``processed`` is already counted at this hook), or ``should_stop`` set, e.g.
    by ``max_time``'s Timer or early stopping, once ``min_epochs``/``min_steps`` are satisfied.
    """
    fit_loop = trainer.fit_loop
    if fit_loop.max_steps != -1 and trainer.global_step >= fit_loop.max_steps:
        return True
    max_epochs = fit_loop.max_epochs
    if max_epochs is not None and max_epochs != -1 and fit_loop.epoch_progress.current.processed >= max_epochs:
        return True
    return bool(trainer.should_stop and getattr(fit_loop, "_can_stop_early", True))


class ModelCheckpoint(LightningModelCheckpoint):
    """``ModelCheckpoint`` that never loses the end of a run.

    Lightning saves on its schedule (validation end or every N steps/epochs) and, at ``on_train_end``, writes
    ``last.ckpt`` only if nothing was saved at all. A run stopped by ``max_steps`` or ``max_time`` between two
    scheduled saves therefore ends with a ``last.ckpt`` that is older than the model it trained: silent loss of
    the last steps. This subclass saves ``last.ckpt`` once more at the final epoch end when the newest checkpoint
    is behind ``global_step``. It does so in ``on_train_epoch_end``, not ``on_train_end``: by ``on_train_end``
    the EMA callback has already copied the EMA weights over the raw ones, and a checkpoint
    written then could not resume exactly (its ``current_model_state`` would hold the EMA weights).

    The write is Lightning's own (temporary file, then rename), on rank 0, with the usual barrier under DDP; the
    decision is the same on every rank (``should_stop`` is broadcast by Lightning).

    Order of the files: at a scheduled save (no ``monitor``) ``last.ckpt`` is written *before* ``step*.ckpt``, so a
    run killed between the two writes leaves ``last.ckpt`` newer than (or as new as) every ``step*.ckpt``, never
    older (Lightning writes the step file first). Each file is complete or absent, never partial (renamed into
    place). With a ``monitor``, Lightning's own order is kept (top-k first).

    A write that fails (a full disk: ``OSError`` ENOSPC) raises :class:`CheckpointWriteError` naming the file; the
    temporary file is discarded and the previous checkpoint under that name stays as it was.
    """

    _last_written_at: int | None = None  # global step at which last.ckpt was written ahead of the step file

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self.save_last or self._should_skip_saving_checkpoint(trainer) or not fit_is_stopping(trainer):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_none_monitor_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # Lightning's body, with last.ckpt saved first; best_model_path is set before either write, so the state
        # recorded in last.ckpt already names the step file that follows it
        filepath = self._get_metric_interpolated_filepath_name(monitor_candidates, trainer, self.best_model_path)
        previous, self.best_model_path = self.best_model_path, filepath
        self._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_at = trainer.global_step
        self._save_checkpoint(trainer, filepath)
        if self.save_top_k == 1 and previous and self._should_remove_checkpoint(trainer, previous, filepath):
            self._remove_checkpoint(trainer, previous)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self._last_written_at != trainer.global_step:  # not already written ahead of the step file
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as err:
            raise CheckpointWriteError(
                f"checkpoint {filepath} could not be written ({err.strerror or err}); the file already there, if "
                "any, is unchanged (checkpoints are written to a temporary file and renamed only when complete). "
                "Free space or choose callbacks.model_checkpoint.dirpath elsewhere, then resume with "
                "ckpt_path=<the newest checkpoint>"
            ) from err

"""Resuming a checkpoint of an epoch that ``max_steps`` or ``max_time`` cut short: the rest of that epoch, once."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


class CutEpochRestore(pl.Callback):
    """Marks the epoch of a checkpoint written when the run stopped in its middle as unfinished, as Lightning's own
    mid-epoch checkpoints are.

    When ``max_steps`` (or ``should_stop``: ``max_time``, early stopping) ends fit in the middle of an epoch,
    Lightning counts that epoch as *processed* in the checkpoint it writes then. Resumed, Lightning either skips the
    rest of the epoch and starts the next one (a run without a step limit: ``FitLoop.restarting`` sees no unfinished
    epoch, so the training loader's state, :mod:`difflab.data.order`'s resume point, is never restored — a data order
    the uninterrupted run never saw), or finishes it but counts it twice (an iteration-based run: ``max_epochs``
    stops one epoch early). With the epoch's ``processed`` count taken back (``processed = started − 1``, the state
    of a checkpoint written by ``every_n_train_steps``), both resume into the rest of the epoch and count it once.
    An epoch whose last batch was trained (``is_last_batch``) is left as Lightning wrote it.
    """

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        loop = checkpoint.get("loops", {}).get("fit_loop", {})
        epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
        if epochs is None or batches is None or batches.get("is_last_batch", True):
            return
        if batches["current"]["completed"] and all(_cut_short(epochs[key]) for key in ("total", "current")):
            for key in ("total", "current"):
                epochs[key]["processed"] -= 1


def _cut_short(progress: dict[str, Any]) -> bool:
    """An epoch started and counted processed but not completed: fit ended inside it."""
    started, processed, completed = progress["started"], progress["processed"], progress["completed"]
    return started == processed == completed + 1

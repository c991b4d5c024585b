"""Objects the subprocess tests inject through the config (``+callbacks.NAME._target_=tests.helpers...``; the
subprocesses get the repository root on PYTHONPATH)."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl


class RaiseOnRank(pl.Callback):
    """Raise in rank ``rank`` before training step ``step``; write the time of the raise to ``stamp``."""

    def __init__(self, rank: int = 1, step: int = 2, stamp: str | None = None) -> None:
        self.rank, self.step, self.stamp = rank, step, stamp

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            if self.stamp:
                Path(self.stamp).write_text(str(time.time()))
            raise RuntimeError(f"injected failure on rank {self.rank} at step {self.step}")

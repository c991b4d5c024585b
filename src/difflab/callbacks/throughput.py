"""Training throughput of a run (images/s), for the run summary and sweep tables.

Lightning's ``ThroughputMonitor`` reads the clock after a ``torch.cuda.synchronize()`` at the end of *every* batch, a
host-device synchronisation per step that the platform avoids (see ``difflab.modules.step_logging``). This callback
reads the clock only at boundaries: after ``warmup_steps`` steps (compilation, allocator warm-up), around each
validation (which it leaves out), and at the end of training — one device sync at each.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch


def _sync(module: pl.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


class TrainThroughput(pl.Callback):
    """Images per second of the training steps after ``warmup_steps`` (all ranks together), validation excluded.

    ``images`` counts every training image of the run (all ranks, warm-up included: the training compute);
    ``images_per_s`` is None when the run ends before the clock starts (fewer than ``warmup_steps + 1`` steps).
    Checkpoint writes and the EMA update between steps count as training time.
    """

    def __init__(self, warmup_steps: int = 10) -> None:
        if warmup_steps < 0:
            raise ValueError(f"TrainThroughput: warmup_steps={warmup_steps}, expected >= 0")
        self.warmup_steps = warmup_steps
        self.steps = self.images = self.timed_images = 0
        self.seconds = 0.0
        self._since: float | None = None  # clock at the start of the current timed stretch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self.steps == self.warmup_steps and self._since is None:
            _sync(pl_module)
            self._since = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        count = len(batch[0]) * trainer.world_size  # host-side shape, no sync
        self.steps += 1
        self.images += count
        if self.steps > self.warmup_steps:
            self.timed_images += count

    def _pause(self, pl_module: pl.LightningModule) -> None:
        if self._since is not None:
            _sync(pl_module)
            self.seconds += time.perf_counter() - self._since
            self._since = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.steps > self.warmup_steps and not trainer.sanity_checking:
            _sync(pl_module)
            self._since = time.perf_counter()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause(pl_module)

    @property
    def images_per_s(self) -> float | None:
        return self.timed_images / self.seconds if self.seconds > 0 and self.timed_images else None

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


class DumpWeightsAtTrainStart(pl.Callback):
    """At the start of training (after a resume has restored everything), write the full raw weights and the full EMA
    weights (gathered from shards under trainer=fsdp) to ``path`` (rank 0), as {"raw": {...}, "ema": {...}}."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import torch
        from torch.distributed.tensor import DTensor

        from difflab.callbacks.ema import EMA

        def full(t):
            return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()

        raw = {name: full(p) for name, p in pl_module.named_parameters()}
        ema = {}
        for callback in trainer.callbacks:
            if isinstance(callback, EMA) and callback._shards(pl_module) is not None:
                ema = {name: full(t) for name, t in callback._shards(pl_module).average.items()}
        if trainer.is_global_zero:
            torch.save({"raw": raw, "ema": ema, "step": trainer.global_step}, self.path)

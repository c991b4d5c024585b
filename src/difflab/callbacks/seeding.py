"""Distinct, reproducible random streams per DDP rank."""

from __future__ import annotations

import lightning.pytorch as pl


class RankSeedCallback(pl.Callback):
    """Reseed every process at the start of training from (seed, global rank, global step).

    ``seed_everything`` gives every DDP rank the same seed, so without this all ranks would draw the same
    timesteps t and noise ε for their different images. Including the global step makes a resumed run
    reproducible too (it does not replay the exact stream of an uninterrupted run).
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed = (self.seed + 1_000_003 * trainer.global_rank + 7_919 * trainer.global_step) % (2**32)
        pl.seed_everything(seed, workers=True, verbose=False)

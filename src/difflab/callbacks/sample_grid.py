"""Sample grids during training, drawn with the EMA weights and the model's configured sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from difflab.utils.images import image_grid, save_grid
from difflab.utils.loggers import log_image


class SampleGridCallback(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, sample ``num_samples`` images and save/log a grid.

    Runs in ``on_validation_batch_end`` of the first batch: the EMA callback has swapped the
    EMA weights in for the whole validation epoch, so samples use them. Only global rank 0 samples (there is no
    collective inside the loop, so other ranks do not wait on it). The seed is fixed, so grids of successive
    epochs show the same noise becoming better images.
    """

    def __init__(self, every_n_epochs: int = 1, num_samples: int = 64, seed: int = 0, steps: int | None = None) -> None:
        if every_n_epochs < 1 or num_samples < 1:
            raise ValueError("callbacks.sample_grid: every_n_epochs and num_samples must be >= 1")
        self.every_n_epochs, self.num_samples, self.seed, self.steps = every_n_epochs, num_samples, seed, steps

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx or dataloader_idx or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if not hasattr(pl_module, "sample"):  # e.g. model=classifier with the default callbacks
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        images = pl_module.sample(self.num_samples, generator=generator, num_steps=self.steps)
        out_dir = Path(trainer.default_root_dir) / "samples"
        save_grid(images, out_dir / f"epoch{trainer.current_epoch:04d}_step{trainer.global_step:07d}.png")
        log_image(trainer.loggers, "samples", image_grid(images), trainer.global_step)

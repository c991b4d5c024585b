"""Sample grids during training, drawn with the EMA weights and the model's configured sampler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from difflab.strategies.fsdp import is_sharded_strategy
from difflab.utils.images import image_grid
from difflab.utils.labels import class_names_of, class_tags, grid_classes, save_labelled_grid
from difflab.utils.loggers import log_image


def sample_class_rows(
    module: Any, num_samples: int, generator: torch.Generator, names: list[str] | None = None, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None, int | None]:
    """(images, labels, per-image tags, row length) of a training-time grid: a class-conditional model draws one row per
    class (tagged with ``names``, else ``class i``; see :func:`~difflab.utils.labels.grid_classes`), an
    unconditional one ``num_samples`` untagged images. ``kwargs`` go to ``module.sample``."""
    labels, nrow = grid_classes(getattr(module, "num_classes", None), num_samples)
    if labels is None:
        return module.sample(num_samples, generator=generator, **kwargs), None, None, None
    images = module.sample(labels.numel(), generator=generator, y=labels.to(module.device), **kwargs)
    return images, labels, class_tags(labels, names), nrow


class SampleGridCallback(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, sample ``num_samples`` images and save/log a grid.

    A class-conditional model's grid has one row per class, labelled with the data's class names.
    Runs in ``on_validation_batch_end`` of the first batch: the EMA callback has swapped the
    EMA weights in for the whole validation epoch, so samples use them. Only global rank 0 samples (there is no
    collective inside the loop, so other ranks do not wait on it); under ``trainer=fsdp`` every process samples (each
    forward gathers the sharded weights) and rank 0 writes. The seed is fixed, so grids of successive
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
        # under trainer=fsdp every process samples (each forward gathers the sharded weights), rank 0 writes
        if batch_idx or dataloader_idx or trainer.sanity_checking:
            return
        if not (trainer.is_global_zero or is_sharded_strategy(trainer.strategy)):
            return
        if not hasattr(pl_module, "sample"):  # e.g. model=classifier with the default callbacks
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        names = class_names_of(getattr(trainer, "datamodule", None))
        images, _, tags, nrow = sample_class_rows(pl_module, self.num_samples, generator, names, num_steps=self.steps)
        if not trainer.is_global_zero:
            return
        out_dir = Path(trainer.default_root_dir) / "samples"
        name = f"epoch{trainer.current_epoch:04d}_step{trainer.global_step:07d}.png"
        save_labelled_grid(images, out_dir / name, nrow=nrow, tags=tags)  # class-conditional: a row per class
        log_image(trainer.loggers, "samples", image_grid(images, nrow), trainer.global_step)

"""FID / KID / IS during (distributed) training, on a named feature network."""

from __future__ import annotations

import json
import logging
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from difflab.metrics import GenerativeMetrics
from difflab.utils.images import image_grid
from difflab.utils.loggers import log_image

log = logging.getLogger(__name__)


def _plain(config: Any) -> Any:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else config


class GenerativeMetricsCallback(pl.Callback):
    """Every ``every_n_epochs`` validation epochs (and at the end of fit) generate ``num_samples`` images — each DDP
    rank its share, with seed ``seed + rank`` — with the model's sampler and the EMA weights, and log
    ``val/fid_<net>``, ``val/kid_<net>``, ``val/is_<net>``.

    Real statistics (``num_real`` images of the data module's ``real_split``) are computed once and cached in
    ``cache_dir`` (keyed by ``data_config`` — the data config, ``${data}`` — split, feature net and count; without
    ``data_config`` nothing is cached). Every rank runs ``compute`` (the
    torchmetrics all-reduce; calling it on one rank only would hang the others); only rank 0 logs the grid.
    The EMA weights are in place during validation (the EMA callback swaps them in for the
    whole epoch, so this runs in ``on_validation_batch_end`` of the first batch) and after ``on_train_end`` of an
    EMA callback listed before this one (the default order).
    """

    def __init__(
        self,
        metrics: list[str] | tuple[str, ...] = ("fid", "kid", "is"),
        feature_net: str = "fmnist_cls",
        every_n_epochs: int = 10,
        num_samples: int = 1000,
        num_real: int = 1000,
        batch_size: int = 250,
        real_split: str = "train",
        cache_dir: str | None = None,
        seed: int = 0,
        inception_weights: str | None = None,
        kid_subset_size: int = 100,
        at_fit_end: bool = True,
        data_config: dict[str, Any] | None = None,
    ) -> None:
        if every_n_epochs < 1 or num_samples < 2 or num_real < 2:
            raise ValueError("callbacks.generative_metrics: every_n_epochs >= 1, num_samples and num_real >= 2")
        self.kwargs = {
            "metrics": list(metrics),
            "feature_net": feature_net,
            "inception_weights": inception_weights,
            "kid_subset_size": min(kid_subset_size, num_samples, num_real),
        }
        self.every_n_epochs, self.num_samples, self.num_real = every_n_epochs, num_samples, num_real
        self.batch_size, self.real_split, self.cache_dir = batch_size, real_split, cache_dir
        self.seed, self.at_fit_end = seed, at_fit_end
        # the cache key of the real statistics (a plain dict: Hydra passes a DictConfig with _recursive_: false)
        self.data_config = None if data_config is None else json.loads(json.dumps(_plain(data_config), default=str))
        self.metrics: GenerativeMetrics | None = None
        self._last: tuple[int, dict[str, float]] | None = None  # (global_step, values) of the latest evaluation

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.metrics is None:
            self.metrics = GenerativeMetrics(**self.kwargs)  # fails here, before training, if the net is missing

    def _real_batches(self, trainer: pl.Trainer):
        datamodule = trainer.datamodule
        dataset = getattr(datamodule, self.real_split, None)
        if dataset is None:
            raise ValueError(f"callbacks.generative_metrics.real_split={self.real_split!r}: no such split")
        dataset = getattr(dataset, "source", dataset)  # model.cache_latents replaced the images by latents
        for x, _ in DataLoader(dataset, batch_size=self.batch_size, shuffle=False):  # the same on every rank
            yield x

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Generate this rank's share, update, compute on every rank; returns the metric values."""
        assert self.metrics is not None
        self.metrics.to(pl_module.device)
        key = None if self.data_config is None else {"data": self.data_config, "split": self.real_split}
        self.metrics.fill_real(self._real_batches(trainer), self.num_real, key, self.cache_dir)
        rank, world = trainer.global_rank, trainer.world_size
        share = self.num_samples // world + (rank < self.num_samples % world)
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed + rank)
        first = None
        for start in range(0, share, self.batch_size):
            images = pl_module.sample(min(self.batch_size, share - start), generator=generator)
            self.metrics.update_fake(images)
            first = images if first is None else first
        values = self.metrics.compute()
        if trainer.is_global_zero and first is not None:
            real = next(iter(self._real_batches(trainer)))[: min(32, first.shape[0])].to(first.device)
            log_image(
                trainer.loggers,
                "samples/real_vs_generated",
                image_grid(torch.cat([real, first[: real.shape[0]]])),
                trainer.global_step,
            )
        return values

    def _log(self, pl_module: pl.LightningModule, values: dict[str, float]) -> None:
        for name, value in values.items():
            pl_module.log(f"val/{name}", value, sync_dist=False, rank_zero_only=True)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx or dataloader_idx or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        values = self.evaluate(trainer, pl_module)
        self._last = (trainer.global_step, values)
        self._log(pl_module, values)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end and not trainer.sanity_checking:
            # The last validation may have evaluated these very weights (EMA, same step, same seed): reuse it.
            last = self._last
            values = last[1] if last and last[0] == trainer.global_step else self.evaluate(trainer, pl_module)
            final = {f"final/{k}": v for k, v in values.items()}
            # also in callback_metrics (self.log is closed in on_train_end): the run's final metrics, run_summary.json
            trainer.callback_metrics.update({k: torch.tensor(float(v)) for k, v in final.items()})
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(final, step=trainer.global_step)

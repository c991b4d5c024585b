"""SSIM / PSNR (and LPIPS when its backbone weights are present) for modules that reconstruct their input."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from difflab.metrics.feature_nets import LPIPS_BACKBONES
from difflab.metrics.reconstruction import ReconstructionMetrics, lpips_unavailable
from difflab.utils.images import image_grid
from difflab.utils.labels import save_labelled_grid
from difflab.utils.loggers import log_image

log = logging.getLogger(__name__)


class ReconstructionMetricsCallback(pl.Callback):
    """On the first ``max_batches`` validation batches, compare ``pl_module.reconstruct(x)`` with x (both in
    [-1, 1]): log ``val/ssim``, ``val/psnr`` and, only when the ImageNet backbone file is in
    ``$TORCH_HOME/hub/checkpoints/``, ``val/lpips_<net>``. Otherwise LPIPS is skipped with one log line saying
    why — an LPIPS number from an untrained backbone is never reported.
    """

    def __init__(self, lpips_net: str | None = "alex", max_batches: int = 4, log_grid: bool = True) -> None:
        if lpips_net is not None and lpips_net not in LPIPS_BACKBONES:
            raise ValueError(
                f"callbacks.reconstruction_metrics.lpips_net={lpips_net!r}: expected {list(LPIPS_BACKBONES)}"
            )
        self.lpips_net, self.max_batches, self.log_grid = lpips_net, max_batches, log_grid
        self.metrics: ReconstructionMetrics | None = None
        self.skip_reason: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "reconstruct"):
            raise TypeError(
                f"ReconstructionMetricsCallback needs a module with reconstruct(x); got {type(pl_module).__name__}"
            )
        if hasattr(pl_module, "reconstruction_sampler"):
            pl_module.reconstruction_sampler()  # a model without a DDIM inversion (EDM) fails here, not mid-fit
        if self.metrics is not None:
            return
        net = self.lpips_net
        if net is not None and (reason := lpips_unavailable(net)):
            self.skip_reason = f"LPIPS skipped: {reason} to enable val/lpips_{net}"
            log.warning(self.skip_reason)
            net = None
        self.metrics = ReconstructionMetrics(net)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx >= self.max_batches or dataloader_idx or trainer.sanity_checking:
            return
        x = batch[0]
        with torch.no_grad():
            x_hat = pl_module.reconstruct(x).clamp(-1, 1)
        self.metrics.to(x.device).update(x_hat, x)
        if batch_idx == 0 and self.log_grid and trainer.is_global_zero:
            self._write_grid(trainer, x[:16], x_hat[:16])

    @staticmethod
    def _write_grid(trainer: pl.Trainer, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        """Input / reconstruction pairs, 4 per row under column headers: saved in the run dir
        (``reconstructions/step<N>.png``, whatever the logger) and sent to the loggers that show images."""
        pairs = torch.stack([x, x_hat], dim=1).flatten(0, 1)
        name = f"step{trainer.global_step:07d}.png"
        tags = ["input", "reconstruction"] * x.shape[0]
        save_labelled_grid(pairs, Path(trainer.default_root_dir) / "reconstructions" / name, nrow=8, tags=tags)
        log_image(trainer.loggers, "reconstructions", image_grid(pairs, nrow=8), trainer.global_step)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.metrics is None or not self.metrics.update_count:
            return
        for name, value in self.metrics.compute().items():
            pl_module.log(f"val/{name}", value, sync_dist=False)  # torchmetrics already synced
        self.metrics.reset()

"""SSIM / PSNR (and LPIPS when its backbone weights are present) for modules that reconstruct their input."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from difflab.metrics.feature_nets import LPIPS_BACKBONES, lpips_weights_path, verified_lpips_weights
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
        self.ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self.psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.lpips: Any = None
        self.skip_reason: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "reconstruct"):
            raise TypeError(
                f"ReconstructionMetricsCallback needs a module with reconstruct(x); got {type(pl_module).__name__}"
            )
        if self.lpips_net is None or self.lpips is not None or self.skip_reason:
            return
        if verified_lpips_weights(self.lpips_net) is None:
            path = lpips_weights_path(self.lpips_net)
            self.skip_reason = (
                f"LPIPS skipped: its ImageNet backbone weights {path} are missing (no download here); put "
                f"{LPIPS_BACKBONES[self.lpips_net]} there to enable val/lpips_{self.lpips_net}"
            )
            log.warning(self.skip_reason)
            return
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.lpips = LearnedPerceptualImagePatchSimilarity(net_type=self.lpips_net, normalize=False)

    def _metrics(self) -> list[Any]:
        return [m for m in (self.ssim, self.psnr, self.lpips) if m is not None]

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
        for metric in self._metrics():
            metric.to(x.device)
        self.ssim.update(x_hat, x)
        self.psnr.update(x_hat, x)
        if self.lpips is not None:
            rgb = lambda t: t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t  # noqa: E731
            self.lpips.update(rgb(x_hat), rgb(x))
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
        if trainer.sanity_checking or not self.ssim.update_count:
            return
        names = {id(self.ssim): "val/ssim", id(self.psnr): "val/psnr", id(self.lpips): f"val/lpips_{self.lpips_net}"}
        for metric in self._metrics():
            pl_module.log(names[id(metric)], metric.compute(), sync_dist=False)  # torchmetrics already synced
            metric.reset()

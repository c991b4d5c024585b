"""Log the full-chain NLL bound (bits/dim) on a validation subset every N epochs."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch


def check_likelihood(module: Any, key: str) -> None:
    """A clear error unless ``module`` has the full-chain bound in bits/dim: a Gaussian diffusion's VLB (not a
    classifier, an autoencoder, or a rectified flow, whose likelihood would need the ODE's divergence)."""
    if not hasattr(module, "nll"):
        raise ValueError(f"{key}: {type(module).__name__} has no likelihood")
    process = getattr(module.diffusion, "process_kind", "gaussian")
    if process != "gaussian":
        kind = "a rectified flow" if process == "flow" else "an EDM-family (σ process) model"
        raise ValueError(
            f"{key}: the bound in bits/dim is a discrete Gaussian diffusion's VLB; this model is {kind}: its "
            "likelihood is the probability-flow ODE's (eval.py metrics=[ode_nll])"
        )


class NLLCallback(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, compute −log p(x) ≤ L_vlb in bits/dim on the first ``num_images``
    validation images (per rank) with the EMA weights (swapped in by the EMA callback for the whole
    validation epoch), and log ``val/nll_bpd`` with its prior term L_T and decoder term L_0 separately.

    Costs T network evaluations per validation batch used: keep ``num_images`` small for frequent logging.
    """

    def __init__(self, every_n_epochs: int = 10, num_images: int = 64, seed: int = 0) -> None:
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError("callbacks.nll: every_n_epochs and num_images must be >= 1")
        self.every_n_epochs, self.num_images, self.seed = every_n_epochs, num_images, seed
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_likelihood(pl_module, "callbacks.nll")  # at fit start, not at the first NLL epoch

    def _active(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums, self._count = {}, 0

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        remaining = self.num_images - self._count
        if remaining <= 0 or dataloader_idx or not self._active(trainer):
            return
        x, y = batch
        x, y = x[:remaining], y[:remaining]
        generator = torch.Generator(device=x.device).manual_seed(self.seed + batch_idx)
        result = pl_module.nll(x, y, generator=generator)
        for key in ("total_bpd", "prior_bpd", "decoder_bpd"):
            self._sums[key] = self._sums.get(key, 0) + result[key].sum()
        self._count += x.shape[0]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._count:
            return
        names = {"total_bpd": "val/nll_bpd", "prior_bpd": "val/nll_prior_bpd", "decoder_bpd": "val/nll_decoder_bpd"}
        for key, name in names.items():
            pl_module.log(name, self._sums[key] / self._count, sync_dist=True)

"""SSIM / PSNR / LPIPS of reconstructions against their inputs: one set of torchmetrics for the autoencoder's
validation callback, ``eval.py metrics=[ssim,psnr,lpips]`` and ``sample.py mode=reconstruct``."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from difflab.metrics.feature_nets import LPIPS_BACKBONES, lpips_weights_path, verified_lpips_weights

RECONSTRUCTION_METRICS = ("ssim", "psnr", "lpips")


def lpips_unavailable(net_type: str) -> str | None:
    """Why LPIPS with the ``net_type`` ImageNet backbone cannot be computed here (its weights file is missing: no
    download here), None when it can. An LPIPS number from an untrained backbone is never reported."""
    if net_type not in LPIPS_BACKBONES:
        return f"lpips_net={net_type!r}: expected one of {list(LPIPS_BACKBONES)}"
    if verified_lpips_weights(net_type) is None:
        return (
            f"its ImageNet backbone weights {lpips_weights_path(net_type)} are missing (no download here); put "
            f"{LPIPS_BACKBONES[net_type]} there"
        )
    return None


class ReconstructionMetrics(torch.nn.Module):
    """Running SSIM, PSNR (images in [-1, 1]: data range 2) and, with ``lpips_net``, LPIPS (1-channel images are
    repeated to RGB) over ``update(x_hat, x)`` calls; ``compute()`` gives ``{ssim, psnr, lpips_<net>}`` as floats.
    The LPIPS backbone must be available (:func:`lpips_unavailable` is None)."""

    def __init__(self, lpips_net: str | None = None) -> None:
        super().__init__()
        self.lpips_net = lpips_net
        self.ssim = StructuralSimilarityIndexMeasure(data_range=2.0)
        self.psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.lpips: Any = None
        if lpips_net is not None:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.lpips = LearnedPerceptualImagePatchSimilarity(net_type=lpips_net, normalize=False)

    @property
    def update_count(self) -> int:
        return self.ssim.update_count

    def update(self, x_hat: torch.Tensor, x: torch.Tensor) -> None:
        """x_hat, x: (B, C, H, W) in [-1, 1]."""
        self.ssim.update(x_hat, x)
        self.psnr.update(x_hat, x)
        if self.lpips is not None:
            rgb = lambda t: t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t  # noqa: E731
            self.lpips.update(rgb(x_hat), rgb(x))

    def compute(self) -> dict[str, float]:
        values = {"ssim": float(self.ssim.compute()), "psnr": float(self.psnr.compute())}
        if self.lpips is not None:
            values[f"lpips_{self.lpips_net}"] = float(self.lpips.compute())
        return values

    def reset(self) -> None:
        for metric in (self.ssim, self.psnr, self.lpips):
            if metric is not None:
                metric.reset()

"""The distance d(·, ·) of the consistency losses (Song et al. 2023 §3, eq. 7; Song & Dhariwal 2023 §3.3).

- ``l2``: mean over pixels of (x − y)² (the paper's ||x − y||²₂ divided by d: the same optimum and, under Adam, the
  same steps).
- ``pseudo_huber``: sqrt(||x − y||²₂ + c²) − c over the whole image (iCT eq. 8), c = 0.00054 sqrt(d) by default
  (iCT §3.3: d = C·H·W).
- ``lpips``: LPIPS (Zhang et al. 2018), CM's best metric. It needs the ImageNet backbone weights, which this machine
  does not have (no download): then construction is an error that names the alternatives. Note that LPIPS on
  images of 8–32 pixels is outside what it was calibrated on (CM upsamples to 224).
- ``fmnist_cls`` | ``fmnist_cls_v2`` | ``mnist_cls``: the same LPIPS recipe (unit-normalised channel activations,
  squared differences, spatial mean, summed over layers) on the hidden layers of difflab's shipped dataset classifier
  (:class:`difflab.losses.perceptual.ClassifierPerceptual`), without LPIPS' learned linear weights: *not* LPIPS,
  and named for what it is in configs and logs. For pixel-space images in [−1, 1] of the classifier's data.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from difflab.losses.perceptual import build_perceptual
from difflab.utils.enums import StrEnumChoice, parse_enum


class ConsistencyMetric(StrEnumChoice):
    L2 = "l2"
    PSEUDO_HUBER = "pseudo_huber"
    LPIPS = "lpips"
    FMNIST_CLS = "fmnist_cls"
    FMNIST_CLS_V2 = "fmnist_cls_v2"
    MNIST_CLS = "mnist_cls"


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(||x − y||² + c²) − c per example (B,) for x, y (B, …) (iCT eq. 8), in float32 or wider."""
    diff = (x - y).flatten(1).to(torch.promote_types(x.dtype, torch.float32))
    return (diff.pow(2).sum(dim=1) + c * c).sqrt() - c


def default_huber_c(data_dim: int) -> float:
    """iCT §3.3: c = 0.00054 sqrt(d) for data of d = C·H·W dimensions (0.03 for CIFAR-10's 3,072)."""
    return 0.00054 * math.sqrt(data_dim)


class ConsistencyDistance(nn.Module):
    """d(x, y) per example (B,) for x, y (B, C, H, W). ``huber_c``: pseudo-Huber's c (None: iCT's default for
    ``data_dim``). A perceptual net is frozen and, like the teacher, no part of the state dict."""

    def __init__(self, metric: str | ConsistencyMetric, data_dim: int, huber_c: float | None = None) -> None:
        super().__init__()
        self.metric = parse_enum(ConsistencyMetric, metric, "model.metric")
        if huber_c is not None and not huber_c > 0:
            raise ValueError(f"model.huber_c={huber_c}: expected > 0 (null: 0.00054·sqrt(C·H·W))")
        self.huber_c = default_huber_c(data_dim) if huber_c is None else float(huber_c)
        self.__dict__["perceptual"] = None  # a plain attribute: no weights of it in checkpoints
        if self.metric in (ConsistencyMetric.L2, ConsistencyMetric.PSEUDO_HUBER):
            return
        try:
            self.__dict__["perceptual"] = build_perceptual(self.metric.value)
        except FileNotFoundError as error:
            raise ValueError(
                f"model.metric=lpips: {error}. LPIPS needs ImageNet backbone weights that are not available "
                "offline; use model.metric=pseudo_huber (iCT's choice), l2, or fmnist_cls | fmnist_cls_v2 | "
                "mnist_cls (an LPIPS-like distance on difflab's shipped classifier features, not LPIPS)"
            ) from None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.metric is ConsistencyMetric.L2:
            return (x - y).float().pow(2).flatten(1).mean(dim=1)
        if self.metric is ConsistencyMetric.PSEUDO_HUBER:
            return pseudo_huber(x, y, self.huber_c)
        net = self.__dict__["perceptual"].to(x.device)
        return net(x, y)

"""A small CNN classifier: the offline feature network of difflab's FID/KID/IS (metric names say which net)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClassifierNet(nn.Module):
    """Conv-BN-ReLU blocks (two stride-2), global average pooling, a ``num_features``-d embedding, logits.

    x: (B, in_channels, H, W) in [-1, 1], resized to ``image_size`` first → logits (B, num_classes).
    ``features(x)`` gives the penultimate (B, num_features) activations used for FID/KID.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 32,
        width: int = 32,
        num_features: int = 128,
    ) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.num_features = num_features

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(
            block(in_channels, width, 1),
            block(width, width, 2),
            block(width, 2 * width, 1),
            block(2 * width, 2 * width, 2),
            block(2 * width, 4 * width, 1),
        )
        self.embed = nn.Sequential(nn.Linear(4 * width, num_features), nn.ReLU())
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.embed(self.body(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

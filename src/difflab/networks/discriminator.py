"""PatchGAN discriminator (Isola et al. 2017), as used by taming-transformers / latent diffusion for stage 1."""

from __future__ import annotations

import torch
from torch import nn

from difflab.networks.blocks import group_norm


class PatchDiscriminator(nn.Module):
    """``n_layers`` stride-2 4x4 convs with LeakyReLU(0.2), then a stride-1 conv to one logit per patch.

    x (B, C, H, W) → logits (B, 1, H', W'). GroupNorm replaces pix2pix's BatchNorm: real and fake batches are
    scored separately, and BatchNorm would let their statistics differ (and would need SyncBatchNorm under DDP).
    Weights start from N(0, 0.02) as in pix2pix.
    """

    def __init__(self, in_channels: int, ch: int = 64, n_layers: int = 3, num_groups: int = 32) -> None:
        super().__init__()
        if n_layers < 1 or ch < 1:
            raise ValueError(f"discriminator: n_layers={n_layers} and ch={ch} must be >= 1")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        cur = ch
        for i in range(1, n_layers + 1):
            nxt = ch * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(cur, nxt, 4, stride, 1, bias=False), group_norm(nxt, num_groups), nn.LeakyReLU(0.2)]
            cur = nxt
        layers.append(nn.Conv2d(cur, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

"""A small CNN classifier: the offline feature network of difflab's FID/KID/IS (metric names say which net), and,
given a timestep embedding, the noise-conditional classifier p_φ(y | x_t, t) of classifier guidance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.networks.embeddings import timestep_embedding


class ClassifierNet(nn.Module):
    """Conv-Norm-ReLU blocks (two stride-2), global average pooling, a ``num_features``-d embedding, logits.

    x: (B, in_channels, H, W) in [-1, 1], resized to ``image_size`` first → logits (B, num_classes).
    ``features(x)`` gives the penultimate (B, num_features) activations used for FID/KID.

    ``time_embed_dim`` (noise-conditional, for classifier guidance): ``forward(x_t, t)`` with t (B,) timesteps (long,
    or float between the model's steps): the sinusoidal embedding of t through a 2-layer MLP gives every block a
    per-channel scale and shift after its norm, (1 + γ(t)) · h + β(t) (the UNet's scale-shift norm, in the spirit of
    ADM's classifier: the same timestep embedding as the denoiser, on a small encoder). ``norm``: ``batch`` (the
    shipped feature nets) or ``group`` (8 groups; batch statistics pooled over all noise levels suit a classifier
    of noisy images poorly, and GroupNorm keeps the gradient of one image independent of its batch).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 32,
        width: int = 32,
        num_features: int = 128,
        time_embed_dim: int | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.image_size = in_channels, num_classes, image_size
        self.num_features, self.time_embed_dim = num_features, time_embed_dim
        if norm not in ("batch", "group"):
            raise ValueError(f"net.norm={norm!r}: expected batch or group")
        if time_embed_dim is not None and time_embed_dim < 2:
            raise ValueError(f"net.time_embed_dim={time_embed_dim}: expected >= 2 (or null: no timestep input)")

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            normalization = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(8, cout)
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), normalization, nn.ReLU())

        channels = [(in_channels, width, 1), (width, width, 2), (width, 2 * width, 1), (2 * width, 2 * width, 2)]
        channels.append((2 * width, 4 * width, 1))
        self.body = nn.Sequential(*(block(*c) for c in channels))
        self.embed = nn.Sequential(nn.Linear(4 * width, num_features), nn.ReLU())
        self.head = nn.Linear(num_features, num_classes)
        if time_embed_dim is not None:
            hidden = 4 * time_embed_dim
            self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            self.film = nn.ModuleList(nn.Linear(hidden, 2 * cout) for _, cout, _ in channels)

    def features(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        if (t is None) != (self.time_embed_dim is None):
            expected = "x and timesteps t" if self.time_embed_dim else "x only (a classifier of clean images)"
            raise ValueError(f"ClassifierNet(time_embed_dim={self.time_embed_dim}) takes {expected}")
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        if t is None:
            h = self.body(x)
        else:
            emb = self.time_mlp(timestep_embedding(t, self.time_embed_dim))
            h = x
            for (conv, norm, act), film in zip(self.body, self.film, strict=True):
                scale, shift = film(emb)[:, :, None, None].chunk(2, dim=1)
                h = act(norm(conv(h)) * (1 + scale) + shift)
        return self.embed(h.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(x, t))

"""Building blocks of the ADM-style UNet (Dhariwal & Nichol 2021, Appendix; DDPM Appendix B)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise the parameters of the last layer of a residual branch (ADM), so each block starts as identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with at most ``num_groups`` groups that divide ``channels``."""
    groups = min(num_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """GN → SiLU → conv → (+ time/class embedding) → GN → SiLU → dropout → conv, plus a skip.

    With ``use_scale_shift_norm`` the embedding gives (scale, shift) applied as GN(h)·(1 + scale) + shift
    (ADM's adaptive GroupNorm, survey Definition 5.10); otherwise it is added (DDPM).
    x: (B, C_in, H, W), emb: (B, emb_dim) → (B, C_out, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            group_norm(in_channels, num_groups), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_norm = group_norm(out_channels, num_groups)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[..., None, None].to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + emb_out)
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, through ``F.scaled_dot_product_attention``.

    x: (B, C, H, W) → (B, C, H, W); the output projection is zero-initialised (residual starts as identity).
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, num_groups: int = 32) -> None:
        super().__init__()
        if num_head_channels > 0:
            if channels % num_head_channels:
                raise ValueError(f"net.num_head_channels={num_head_channels} must divide the channels ({channels})")
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"net.num_heads={num_heads} must divide the channels ({channels})")
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (DDPM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3x3 convolution (DDPM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def run_block(block: nn.Module, checkpointing: bool, *args: torch.Tensor | None) -> torch.Tensor:
    """``block(*args)``, with activation checkpointing when ``checkpointing`` and gradients are on: the block's
    activations are not kept for the backward pass but recomputed there (``torch.utils.checkpoint``, non-reentrant),
    trading one more forward of the block for its activation memory (Chen et al. 2016). ``net.checkpointing=true``."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)

"""Cross-attention for conditional UNets: the spatial transformer of latent diffusion (Rombach et al. 2022, §3.3).

A feature map (B, C, H, W) becomes H·W tokens that attend to themselves and to a context sequence (B, L, D) from a
conditioner (class embedding, text encoder). Attention runs through ``F.scaled_dot_product_attention``; padded
context tokens are masked out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.networks.blocks import group_norm, zero_module


class Attention(nn.Module):
    """Multi-head attention of queries x (B, N, C) over ``context`` (B, L, D) — or over x itself when None.

    ``mask`` (B, L) bool marks the context tokens to attend to (True = keep); rows with no kept token are not
    allowed (the conditioners always keep at least one token). ``qkv_bias``: biases on the q/k/v projections
    (LDM has none; DiT's ViT attention has them).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"net.num_heads={num_heads} must divide the channels ({dim})")
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, heads, N, d)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        source = x if context is None else context.to(x.dtype)
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(source)), self._heads(self.to_v(source))
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020), as in LDM: (B, N, C) → (B, N, C)."""

    def __init__(self, dim: int, mult: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LN: x + SelfAttn(LN x); x + CrossAttn(LN x, context); x + FF(LN x). x (B, N, C)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int) -> None:
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, num_heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, num_heads, context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GN → 1x1 conv → ``depth`` transformer blocks over the H·W tokens → zero-initialised 1x1 conv, plus the input.

    x (B, C, H, W), context (B, L, context_dim), mask (B, L) bool or None → (B, C, H, W).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        context_dim: int,
        depth: int = 1,
        num_head_channels: int = -1,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        if num_head_channels > 0:
            if channels % num_head_channels:
                raise ValueError(f"net.num_head_channels={num_head_channels} must divide the channels ({channels})")
            num_heads = channels // num_head_channels
        if depth < 1:
            raise ValueError(f"net.transformer_depth={depth}: expected >= 1")
        self.norm = group_norm(channels, num_groups)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(TransformerBlock(channels, num_heads, context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            raise ValueError("this UNet has cross-attention (net.context_dim is set): it needs a context")
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, C)
        for block in self.blocks:
            tokens = block(tokens, context, mask)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))

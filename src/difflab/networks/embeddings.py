"""Sinusoidal timestep embedding (Vaswani et al. 2017; DDPM §4; survey Definition 3.24)."""

from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> torch.Tensor:
    """Embed timesteps t: (B,) as (B, dim): [sin(t ω_k), cos(t ω_k)], ω_k = max_period^(−k/(dim/2 − freq_shift)).

    ``freq_shift`` 0 is DDPM's, ADM's and DiT's; 1 is diffusers' ``downscale_freq_shift=1`` (its DiT's timestep
    features, so that a DiT trained with it exports exactly). Odd ``dim`` is zero-padded by one column.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb

"""Sinusoidal timestep embedding (Vaswani et al. 2017; DDPM §4; survey Definition 3.24), and LCM's guidance-scale
embedding (Luo et al. 2023)."""

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


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's w-features (Luo et al. 2023 §4.2; diffusers' ``get_guidance_scale_embedding``, after VDM): w (B,) →
    (B, dim) = [sin(1000 w ω_k), cos(1000 w ω_k)], ω_k = 10000^(−k/(dim/2 − 1)): the timestep sinusoid of 1000 w."""
    return timestep_embedding(w.float() * 1000.0, dim, freq_shift=1)


class GuidanceEmbedding(torch.nn.Module):
    """The guidance scale w as a network input (LCM's w-conditioning): ``proj(guidance_embedding(w))``, a linear map
    without bias from ``dim`` w-features to ``out_dim``, added to the timestep features before the time MLP (where
    diffusers' ``TimestepEmbedding.cond_proj`` adds it). Zero-initialised, so a network that gains it computes
    exactly what it computed without it until trained (diffusers' training script leaves it at random init).
    Shapes: w (B,) → (B, out_dim)."""

    def __init__(self, out_dim: int, dim: int = 256) -> None:
        super().__init__()
        if dim < 4:
            raise ValueError(f"net.guidance_embed_dim={dim}: expected >= 4 sinusoid features")
        self.dim = dim
        self.proj = torch.nn.Linear(dim, out_dim, bias=False)
        torch.nn.init.zeros_(self.proj.weight)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.proj(guidance_embedding(w, self.dim).to(self.proj.weight.dtype))


def add_guidance(
    features: torch.Tensor, embedding: GuidanceEmbedding | None, w: torch.Tensor | float | None
) -> torch.Tensor:
    """Timestep features (B, D) plus the w-embedding of ``w`` (B,) or a float (None: w = 0) when the network has
    one; a network without it refuses a w (it would be ignored silently)."""
    if embedding is None:
        if w is not None:
            raise ValueError(
                "a guidance scale w was given to a network without a guidance embedding (net.guidance_embed=false)"
            )
        return features
    w = torch.zeros(()) if w is None else torch.as_tensor(w)
    w = w.to(features.device, torch.float32).expand(features.shape[0])
    return features + embedding(w).to(features.dtype)

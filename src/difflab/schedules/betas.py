"""β schedules, named as in the papers that introduced them.

- ``linear``: DDPM (Ho et al. 2020, §4): β_t linear from β_1 = 1e-4 to β_T = 0.02.
  latent-diffusion calls this one "sqrt_linear".
- ``scaled_linear``: latent-diffusion's "linear" (Rombach et al. 2022) = diffusers' "scaled_linear":
  √β_t linear from √β_1 to √β_T (β_1 = 0.00085, β_T = 0.012 in Stable Diffusion).
- ``cosine``: Improved DDPM (Nichol & Dhariwal 2021, eq. 17):
  ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2), β_t = 1 − ᾱ_t/ᾱ_{t−1} clipped at ``max_beta``.
"""

from __future__ import annotations

import math

import torch

from difflab.utils.enums import StrEnumChoice, parse_enum


class BetaSchedule(StrEnumChoice):
    LINEAR = "linear"
    SCALED_LINEAR = "scaled_linear"
    COSINE = "cosine"


def make_betas(
    schedule: BetaSchedule | str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Return β_1..β_T as a float64 tensor of shape (T,). Invalid values raise ``ValueError`` naming the key."""
    schedule = parse_enum(BetaSchedule, schedule, "schedule.beta_schedule")
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"schedule.num_timesteps={num_timesteps!r}: expected an integer >= 1")
    if schedule is BetaSchedule.COSINE:
        if not 0.0 < max_beta < 1.0:
            raise ValueError(f"schedule.max_beta={max_beta!r}: expected a value in (0, 1)")
        if cosine_s < 0:
            raise ValueError(f"schedule.cosine_s={cosine_s!r}: expected a value >= 0")
        return _cosine_betas(num_timesteps, cosine_s, max_beta)
    for key, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"schedule.{key}={value!r}: expected a value in (0, 1)")
    if beta_end < beta_start:
        raise ValueError(f"schedule.beta_end={beta_end!r} must be >= schedule.beta_start={beta_start!r}")
    if schedule is BetaSchedule.LINEAR:
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    # scaled_linear: linspace in √β, then squared.
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def _cosine_betas(num_timesteps: int, s: float, max_beta: float) -> torch.Tensor:
    """Nichol & Dhariwal eq. 17: β_t = min(1 − ᾱ_t/ᾱ_{t−1}, max_beta)."""

    def f(t: torch.Tensor) -> torch.Tensor:
        return torch.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    steps = torch.arange(num_timesteps + 1, dtype=torch.float64)
    alphas_cumprod = f(steps) / f(torch.zeros((), dtype=torch.float64))
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)

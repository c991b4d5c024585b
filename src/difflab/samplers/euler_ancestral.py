"""Euler ancestral sampling (k-diffusion's ``sample_euler_ancestral``; diffusers' EulerAncestralDiscreteScheduler).

Each step from σ to σ' splits σ' into a deterministic part σ_down and fresh noise σ_up (σ_down² + σ_up² = σ'²):
    σ_up = min(σ', η sqrt(σ'² (σ² − σ'²)/σ²)),   σ_down = sqrt(σ'² − σ_up²),
    x̃' = x̃ + (σ_down − σ) ε̂ + σ_up z = x̂_0 + σ_down ε̂ + σ_up z          (x̃ = x_t/α_t)
With η = 1 this is the DDPM posterior step q(x_{t'} | x_t, x̂_0) — DDIM with the same η on the model's timesteps
(Song et al. eq. 16) — on any σ steps. Stochastic, first order, one evaluation per step; no noise at the last step.
"""

from __future__ import annotations

import math

from difflab.samplers.continuous import ContinuousSampler
from difflab.samplers.euler import euler_update


def ancestral_sigmas(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) of a step σ_from → σ_to (k-diffusion's ``get_ancestral_step``)."""
    if sigma_to == 0.0:
        return 0.0, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


class EulerAncestralSampler(ContinuousSampler):
    """``sampler=euler_ancestral``; ``eta`` ≥ 0 scales the fresh noise (1: ancestral, 0: :class:`EulerSampler`)."""

    def __init__(self, *args, eta: float = 1.0, **kwargs) -> None:
        if eta < 0:
            raise ValueError(f"sampler.eta={eta}: expected >= 0")
        self.eta = float(eta)
        super().__init__(*args, **kwargs)

    def solve(self, i, x, x0, eps, generator):
        to = self.levels[i + 1]
        down, up = ancestral_sigmas(self.levels[i].sigma, to.sigma, self.eta)
        x_next = euler_update(x0, eps, down)
        if up > 0:
            x_next = x_next + up * self.noise(x, generator)
        return x_next * to.alpha

"""Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without its second-order step).

In x̃ = x_t/α_t the ODE is dx̃/dσ = (x̃ − x̂_0(x̃, σ))/σ = ε̂ (Karras et al. eq. 4; survey: the probability-flow ODE
dx = [f − ½ g² ∇log p_t] dt written in σ), so one step from σ_i to σ_{i+1} is
    x̃_{i+1} = x̃_i + (σ_{i+1} − σ_i) ε̂_i,
which on the model's timesteps is exactly DDIM with η = 0 (Song et al. eq. 13; Karras et al. §3). First order, one
network evaluation per step, deterministic.
"""

from __future__ import annotations

import torch

from difflab.samplers.continuous import ContinuousSampler


def euler_update(x0: torch.Tensor, eps: torch.Tensor, sigma_to: float) -> torch.Tensor:
    """x̃ at σ_to after an Euler step from (x̃_i, σ_i): x̃_i + (σ_to − σ_i) ε̂ = x̂_0 + σ_to ε̂, since x̃_i = x̂_0 + σ_i ε̂.
    Written from (x̂_0, ε̂) it needs no difference of large numbers at large σ."""
    return x0 + sigma_to * eps


class EulerSampler(ContinuousSampler):
    """``sampler=euler``: first-order probability-flow ODE solver; the arguments as :class:`ContinuousSampler`."""

    def solve(self, i, x, x0, eps, generator):
        to = self.levels[i + 1]
        return euler_update(x0, eps, to.sigma) * to.alpha

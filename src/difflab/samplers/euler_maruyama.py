"""Euler–Maruyama on the reverse-time SDE (Song et al. 2021, §4.1 and eq. 6; Anderson 1982).

The forward process in x̃ = x_t/α_t is dx̃ = sqrt(d[σ²]/dt) dw (variance exploding), whose reverse is
    dx̃ = −(d[σ²]/dt) ∇_x̃ log p(x̃; σ) dt + sqrt(d[σ²]/dt) dw̄,    ∇_x̃ log p = −(x̃ − x̂_0)/σ² = −ε̂/σ.
One Euler–Maruyama step from σ to σ' < σ:
    x̃' = x̃ − (σ² − σ'²) ε̂/σ + sqrt(σ² − σ'²) z
(twice the probability-flow drift, plus the matching noise). The plain first-order SDE discretisation: stochastic,
one evaluation per step, weak at few steps (the drift overshoots on long steps) and converging to the reverse
SDE as the steps shrink. As Song et al. (the final ``x_mean``), the last step to σ = 0 returns its mean, x̂_0.
"""

from __future__ import annotations

import math

from difflab.samplers.continuous import ContinuousSampler


class EulerMaruyamaSampler(ContinuousSampler):
    """``sampler=euler_maruyama``; the arguments as :class:`ContinuousSampler`."""

    def solve(self, i, x, x0, eps, generator):
        s, to = self.levels[i], self.levels[i + 1]
        if to.sigma == 0:
            return x0
        jump = s.sigma**2 - to.sigma**2  # −Δ(σ²) > 0
        # x̃ − jump ε̂/σ = x̂_0 + (σ − jump/σ) ε̂ = x̂_0 + (σ'²/σ) ε̂ (since x̃ = x̂_0 + σ ε̂)
        x_next = x0 + (to.sigma**2 / s.sigma) * eps + math.sqrt(jump) * self.noise(x, generator)
        return x_next * to.alpha

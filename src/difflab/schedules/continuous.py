"""The continuous view of a discrete Gaussian process (Karras et al. 2022 §2; Lu et al. 2022 §2; Song et al. 2021).

With α_t = sqrt(ᾱ_t) and s_t = sqrt(1 − ᾱ_t), x_t = α_t x_0 + s_t ε (DPM-Solver writes σ_t for our s_t). Then
  σ_t = s_t/α_t = sqrt((1 − ᾱ_t)/ᾱ_t)      x_t/α_t = x_0 + σ_t ε   (the variance-exploding view of EDM and k-diffusion)
  λ_t = log(α_t/s_t) = −log σ_t             (half the log-SNR; DPM-Solver's time variable)
  ∇_x log p_t(x_t) = −ε̂/s_t = −(x_t − α_t x̂_0)/s_t²   (Tweedie's formula: the score of any ε/x0/v model)
and the probability-flow ODE in σ is d(x/α)/dσ = ε̂ (Karras et al. eq. 4 with s(t) = α, σ(t) = σ).
A continuous σ maps back to the network's timestep input by linear interpolation of log σ_t over t ∈ [0, T−1]
(k-diffusion's ``DiscreteSchedule.sigma_to_t``, diffusers' ``_sigma_to_t``).

:func:`x0_eps_from_output` is the one place where a network output becomes (x̂_0, ε̂), for tabulated timesteps
(:class:`GaussianDiffusion`) and for continuous noise levels (the solvers) alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from difflab.schedules.parameterization import Parameterization

Coefficient = torch.Tensor | float


@dataclass(frozen=True)
class NoiseLevel:
    """The coefficients of x_t = α x_0 + s ε at one noise level (floats, or tensors broadcastable to x_t).

    ``alpha`` = α = sqrt(ᾱ), ``std`` = s = sqrt(1 − ᾱ), ``recip_alpha`` = 1/α = sqrt(1 + σ²), ``sigma`` = σ = s/α.
    """

    alpha: Coefficient
    std: Coefficient
    recip_alpha: Coefficient
    sigma: Coefficient

    @classmethod
    def from_sigma(cls, sigma: float) -> NoiseLevel:
        """The level of a (float64) σ ≥ 0 as Python floats; σ = 0 is the data (α = 1, s = 0)."""
        recip_alpha = math.sqrt(1.0 + sigma * sigma)
        return cls(alpha=1.0 / recip_alpha, std=sigma / recip_alpha, recip_alpha=recip_alpha, sigma=sigma)

    @property
    def lambda_(self) -> float:
        """λ = log(α/s) = −log σ (+inf at σ = 0)."""
        return math.inf if self.sigma == 0 else -math.log(self.sigma)


def x0_eps_from_output(
    parameterization: Parameterization,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    level: NoiseLevel,
    clip_denoised: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂_0, ε̂) from a network output (B, C, H, W) in ``parameterization`` at noise level ``level``.

    ε:  x̂_0 = x_t/α − σ ε̂                          (Ho et al. eq. 15)
    x0: ε̂ = (x_t/α − x̂_0)/σ
    v:  x̂_0 = α x_t − s v̂,  ε̂ = s x_t + α v̂      (Salimans & Ho 2022, §4)
    With ``clip_denoised`` x̂_0 is clamped to [-1, 1] and ε̂ recomputed from it, so both stay consistent.
    """
    if parameterization is Parameterization.EPS:
        eps = model_output
        x0 = level.recip_alpha * x_t - level.sigma * eps
    elif parameterization is Parameterization.X0:
        x0 = model_output
        eps = eps_from_x0(x_t, x0, level)
    else:
        x0 = level.alpha * x_t - level.std * model_output
        eps = level.std * x_t + level.alpha * model_output
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = eps_from_x0(x_t, x0, level)
    return x0, eps


def output_from_x0_eps(
    parameterization: Parameterization, x0: torch.Tensor, eps: torch.Tensor, level: NoiseLevel
) -> torch.Tensor:
    """The network output in ``parameterization`` that :func:`x0_eps_from_output` maps to (x̂_0, ε̂) (its inverse,
    for a consistent pair x_t = α x̂_0 + s ε̂): ε̂, x̂_0, or v̂ = α ε̂ − s x̂_0 (Salimans & Ho 2022, §4)."""
    if parameterization is Parameterization.EPS:
        return eps
    if parameterization is Parameterization.X0:
        return x0
    return level.alpha * eps - level.std * x0


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """ε̂ = (x_t/α − x̂_0)/σ: the noise that, with x̂_0, makes x_t."""
    return (level.recip_alpha * x_t - x0) / level.sigma


def score(eps: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """∇_x log p_t(x_t) = −ε̂/s (Tweedie): the score of any model, from its ε̂ (see :func:`x0_eps_from_output`)."""
    return -eps / level.std


class ContinuousSchedule:
    """σ_t and λ_t of a discrete process over t ∈ [0, T−1], and the map between a continuous σ and t.

    Built from ᾱ (T,) in float64 on the CPU, where the solvers compute their per-step coefficients once per
    ``set_timesteps``; ``sigmas`` is ascending in t.
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ab = alphas_cumprod.detach().to("cpu", torch.float64)
        self.sigmas = ((1.0 - ab) / ab).sqrt()
        self.log_sigmas = self.sigmas.log()
        if not bool((self.log_sigmas[1:] > self.log_sigmas[:-1]).all()):
            raise ValueError("the schedule's σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) must increase strictly with t")

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def lambdas(self) -> torch.Tensor:
        """λ_t = −log σ_t (T,), descending in t."""
        return -self.log_sigmas

    @property
    def sigma_min(self) -> float:
        """σ at t = 0 (the least noise the network was trained on)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """σ at t = T − 1 (the paper's t = T)."""
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The network timestep (float64, same shape) of each σ: log σ interpolated linearly between neighbouring
        integer t, clamped to [0, T − 1]. Exact at the tabulated σ_t."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, self.num_timesteps - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
        return low.to(torch.float64) + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at continuous timesteps t ∈ [0, T − 1] (float64): log σ interpolated linearly (inverse of sigma_to_t)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

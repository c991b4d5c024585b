"""Progressive distillation's arithmetic (Salimans & Ho 2022): the nested trailing grids of a round, one DDIM step,
the target x̃ of their eq. 10 and the truncated-SNR weight (used by :mod:`difflab.modules.progressive` and stage one of
:mod:`difflab.modules.guidance_distill`)."""

from __future__ import annotations

import torch

from difflab.samplers.base import Spacing, spaced_timesteps
from difflab.schedules import NoiseLevel


def round_grid(alphas_cumprod: torch.Tensor, student_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's trailing grid of 2N points for a student of N steps, from the process's ᾱ (T,) (float64):
    (timesteps (2N,) long ascending, ᾱ (2N + 1,) float64 with ᾱ = 1, the data, at position 0), so position j of the
    second holds τ_j and the network timestep of τ_j is ``timesteps[j − 1]``. The student's grid is τ_2, τ_4, …, τ_2N
    (the trailing grid of N: Spacing.TRAILING's round(T − iT/K) − 1 at K = 2N, i = 2m is the one at K = N, i = m)."""
    timesteps = spaced_timesteps(alphas_cumprod.numel(), 2 * student_steps, Spacing.TRAILING)
    ab = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.to(torch.float64)[timesteps]])
    return timesteps, ab


def level_of(alphas_cumprod: torch.Tensor) -> NoiseLevel:
    """The :class:`NoiseLevel` (α, σ, 1/α, σ/α) of ᾱ (any shape; ᾱ = 1 gives the data: σ = 0)."""
    alpha, std = alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt()
    return NoiseLevel(alpha=alpha, std=std, recip_alpha=1.0 / alpha, sigma=std / alpha)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, to: NoiseLevel) -> torch.Tensor:
    """One DDIM step with η = 0 (Song et al. eq. 12): z_s = α_s x̂ + σ_s ε̂."""
    return to.alpha * x0 + to.std * eps


def distillation_target(z_t: torch.Tensor, z_t2: torch.Tensor, at: NoiseLevel, at2: NoiseLevel) -> torch.Tensor:
    """x̃ of Salimans & Ho eq. 10 from z_t at ``at`` and the teacher's z_{t''} at ``at2``:
    x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t)."""
    ratio = at2.std / at.std
    return (z_t2 - ratio * z_t) / (at2.alpha - ratio * at.alpha)


def truncated_snr_weight(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """max(SNR_t, 1) with SNR_t = ᾱ_t/(1 − ᾱ_t) (Salimans & Ho §4, "truncated SNR" weighting)."""
    return (alphas_cumprod / (1.0 - alphas_cumprod)).clamp(min=1.0)

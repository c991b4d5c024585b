"""The noise paths σ(t) of the score-SDE family, in the variance-exploding view x̃ = x_0 + σ ε (Karras et al. 2022,
Table 1; Song et al. 2021, §3.4 and App. B).

Every Gaussian-marginal linear SDE, written in x̃ = x/s(t), is the pure diffusion dx̃ = sqrt(d[σ²]/dt) dw (its drift
cancels), so these processes differ only in σ(t): the reverse SDE, the probability-flow ODE and their samplers in σ
are shared, and only the training σ distribution and the network's noise input c_noise(σ) (through t) differ.

With B(t) = ∫₀ᵗ β(s) ds = β_min t + ½ β_d t²  (β(t) = β_min + β_d t, β_d = β_max − β_min; Song et al. eq. 32):
  VP      s(t) = e^{−B/2}, std = sqrt(1 − e^{−B})      → σ(t) = sqrt(e^{B} − 1)                 (EDM eq. 23)
  sub-VP  s(t) = e^{−B/2}, std = 1 − e^{−B}            → σ(t) = (1 − e^{−B}) e^{B/2} = 2 sinh(B/2)   (Song eq. 29)
  VE      σ(t) = σ_min (σ_max/σ_min)^t                                                            (Song eq. 31)
and t(σ) inverts B(t) = b: t = (sqrt(β_min² + 2 β_d b) − β_min)/β_d.
The iDDPM cosine schedule's discrete levels u_j (EDM App. C.3.4) are :func:`iddpm_sigmas`.
"""

from __future__ import annotations

import math

import torch


def integrated_beta(t: torch.Tensor, beta_min: float, beta_d: float) -> torch.Tensor:
    """B(t) = β_min t + ½ β_d t² (float64 in, same dtype out)."""
    return beta_min * t + 0.5 * beta_d * t**2


def time_from_integrated_beta(b: torch.Tensor, beta_min: float, beta_d: float) -> torch.Tensor:
    """t with B(t) = b: (sqrt(β_min² + 2 β_d b) − β_min)/β_d (EDM's ``sigma_inv`` for VP)."""
    return ((beta_min**2 + 2.0 * beta_d * b).sqrt() - beta_min) / beta_d


def vp_sigma(t: torch.Tensor, beta_min: float, beta_d: float) -> torch.Tensor:
    """σ(t) = sqrt(e^{B(t)} − 1) of the VP SDE."""
    return torch.expm1(integrated_beta(t, beta_min, beta_d)).sqrt()


def vp_time(sigma: torch.Tensor, beta_min: float, beta_d: float) -> torch.Tensor:
    """t(σ) of the VP SDE: B = log(1 + σ²)."""
    return time_from_integrated_beta(torch.log1p(sigma**2), beta_min, beta_d)


def subvp_sigma(t: torch.Tensor, beta_min: float, beta_d: float) -> torch.Tensor:
    """σ(t) = 2 sinh(B(t)/2) of the sub-VP SDE (its std 1 − e^{−B} over its scale e^{−B/2})."""
    return 2.0 * torch.sinh(0.5 * integrated_beta(t, beta_min, beta_d))


def subvp_time(sigma: torch.Tensor, beta_min: float, beta_d: float) -> torch.Tensor:
    """t(σ) of the sub-VP SDE: B = 2 asinh(σ/2)."""
    return time_from_integrated_beta(2.0 * torch.asinh(0.5 * sigma), beta_min, beta_d)


def ve_sigma(t: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """σ(t) = σ_min (σ_max/σ_min)^t of the VE SDE (t ∈ [0, 1])."""
    return sigma_min * (sigma_max / sigma_min) ** t


def iddpm_sigmas(M: int = 1000, C1: float = 0.001, C2: float = 0.008) -> torch.Tensor:
    """u_0 > u_1 > … > u_M = 0 (M + 1,) float64: the σ of the iDDPM cosine schedule's M steps (EDM App. C.3.4),
    u_{j−1} = sqrt((u_j² + 1)/max(ᾱ(j−1)/ᾱ(j), C1) − 1), ᾱ(j) = sin²(π/2 · j/(M (1 + C2)))."""
    j = torch.arange(M + 1, dtype=torch.float64)
    alpha_bar = torch.sin(0.5 * math.pi * j / (M * (C2 + 1.0))) ** 2
    u = torch.zeros(M + 1, dtype=torch.float64)
    for k in range(M, 0, -1):
        ratio = max(float(alpha_bar[k - 1] / alpha_bar[k]), C1)
        u[k - 1] = math.sqrt((float(u[k]) ** 2 + 1.0) / ratio - 1.0)
    return u


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N (Karras et al. eq. 5), (N,) float64."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho

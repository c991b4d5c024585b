"""Terms of the variational bound (Ho et al. 2020 eq. 5; Nichol & Dhariwal 2021 §2–3), in bits per dimension.

L_vlb = L_0 + Σ_{t>1} L_{t−1} + L_T with
  L_{t−1} = KL(q(x_{t−1}|x_t, x_0) || p_θ(x_{t−1}|x_t))   — a KL between diagonal Gaussians,
  L_0     = −log p_θ(x_0|x_1)                              — the discretised Gaussian decoder (Ho et al. eq. 13),
  L_T     = KL(q(x_T|x_0) || N(0, I))                      — the prior term (no parameters).
"""

from __future__ import annotations

import math

import torch

from difflab.schedules import GaussianDiffusion, Parameterization, VarianceType

LOG2 = math.log(2.0)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats:
    ½ (−1 + logvar2 − logvar1 + e^(logvar1 − logvar2) + (mean1 − mean2)² e^(−logvar2))."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) by the tanh approximation of improved-diffusion (error < 1e-3), kept for reference values."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) = ½ (1 + erf(x/√2)), exact."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) in nats, elementwise, of data x ∈ [-1, 1] quantised to 256 bins of width 2/255 under
    N(means, e^(2 log_scales)) (Ho et al. eq. 13): the mass of [x − 1/255, x + 1/255], with the edge bins
    extended to ±∞."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: (B, ...) → (B,)."""
    return x.flatten(1).mean(dim=1)


def bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    """Per-example mean over dimensions, converted from nats to bits: (B, ...) → (B,)."""
    return mean_flat(nats) / LOG2


def vlb_term(
    diffusion: GaussianDiffusion,
    parameterization: Parameterization,
    variance_type: VarianceType,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """The VLB term of each example at its timestep, in bits/dim: (B,).

    L_{t−1} (KL between Gaussians) for t > 0 and L_0 (the discretised decoder NLL) for t = 0 (index 0 is the
    paper's t = 1). All in fp32, whatever the autocast dtype of ``model_output`` (learned variances in half
    precision give NaNs in several peers).
    """
    x_start, x_t = x_start.float(), x_t.float()
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    out = diffusion.p_mean_variance(parameterization, variance_type, model_output.float(), x_t, t)
    kl = bits_per_dim(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
    decoder_nll = -bits_per_dim(discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"]))
    return torch.where(t == 0, decoder_nll, kl)


def prior_bpd(diffusion: GaussianDiffusion, x_start: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim: (B,). Not trained; reported with the NLL."""
    t = torch.full((x_start.shape[0],), diffusion.num_timesteps - 1, device=x_start.device, dtype=torch.long)
    mean, variance = diffusion.q_mean_variance(x_start.float(), t)
    zeros = torch.zeros_like(mean)
    return bits_per_dim(normal_kl(mean, torch.log(variance), zeros, zeros))

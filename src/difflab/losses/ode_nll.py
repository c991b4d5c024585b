"""Exact likelihood from the probability-flow ODE (Song et al. 2021, §4.3 and App. D.2; Chen et al. 2018; Grathwohl
et al. 2019, FFJORD).

Along dx̃/du = f(x̃, u) (u = ln σ, or τ for a flow; :class:`~difflab.samplers.ODESampler`), the log-density obeys
d log p/du = −∇·f, so for data x̃(u_min) = x (instantaneous change of variables):
    log p_0(x) = log p_T(x̃(u_max)) + ∫_{u_min}^{u_max} ∇·f(x̃(u), u) du,
solved jointly with the state by RK45. ∇·f is estimated by Hutchinson–Skilling, ∇·f ≈ zᵀ (∂f/∂x̃) z with one probe z
per image fixed over the path (Rademacher or Gaussian; one vector–Jacobian product per evaluation), or exactly
(``exact``: one per dimension, for tests). The prior p_T is N(0, s² I) in x̃ with s the sampler's
:meth:`~difflab.samplers.ODESampler.prior_std_tilde` (VE: σ_max; VP: sqrt(1 + σ_max²), i.e. N(0, I) in x_T).
Discrete 8-bit data x ∈ [−1, 1] (256 levels) is dequantised uniformly, x + (u − ½)·2/256 (App. D.2), and
    bits/dim = −log p(x)/(D ln 2) + 7   (log₂ 256 − log₂ 2: the density on [−1, 1] per 8-bit bin),
an upper bound on the discrete NLL in expectation over u. The data starts at σ_min, not 0 (the model's smallest σ).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from difflab.utils.enums import StrEnumChoice, parse_enum


class TraceEstimator(StrEnumChoice):
    RADEMACHER = "rademacher"
    GAUSSIAN = "gaussian"
    EXACT = "exact"


def dequantize(x_start: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform dequantisation of 8-bit images in [−1, 1]: each level k/127.5 − 1 spread over its bin of width 2/256."""
    levels = ((x_start.float() + 1.0) * 127.5).round().clamp(0, 255)
    u = torch.rand(x_start.shape, generator=generator, device=x_start.device)
    return (levels + u) / 128.0 - 1.0


def divergence(
    f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, probe: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), ∇·f(x) (B,)): Hutchinson's zᵀ J z with ``probe`` z, or the exact trace when ``probe`` is None."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = f(x)
        if probe is not None:
            (vjp,) = torch.autograd.grad(out, x, probe)
            return out.detach(), (vjp * probe).flatten(1).sum(1)
        flat = out.flatten(1)
        trace = torch.zeros(x.shape[0], device=x.device)
        for d in range(flat.shape[1]):
            (row,) = torch.autograd.grad(flat[:, d].sum(), x, retain_graph=True)
            trace = trace + row.flatten(1)[:, d]
        return out.detach(), trace


def ode_log_likelihood(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sampler,
    x: torch.Tensor,
    estimator: str | TraceEstimator = TraceEstimator.RADEMACHER,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """log p(x) (B,) in nats of continuous data x (B, C, H, W) (no dequantisation) under the model's PF-ODE;
    ``sampler`` (an :class:`~difflab.samplers.ODESampler` of the model) gives the path, tolerances and NFE count."""
    estimator = parse_enum(TraceEstimator, estimator, "ode_nll_estimator")
    sampler.set_timesteps()
    if estimator is TraceEstimator.EXACT:
        probe = None
    elif estimator is TraceEstimator.GAUSSIAN:
        probe = torch.randn(x.shape, generator=generator, device=x.device)
    else:
        probe = torch.randint(0, 2, x.shape, generator=generator, device=x.device).float() * 2 - 1

    def func(u, state):
        return divergence(lambda y: sampler.velocity(model_fn, float(u), y), state[0], probe)

    start = (x.float(), torch.zeros(x.shape[0], device=x.device))
    x_T, integral = sampler.odeint(func, start, sampler.u_end, sampler.u_start)
    std = sampler.prior_std_tilde(sampler.sigma_of(sampler.u_start)[0])
    dims = x[0].numel()
    prior = -0.5 * (x_T.flatten(1) ** 2).sum(1) / std**2 - dims * (math.log(std) + 0.5 * math.log(2 * math.pi))
    return prior + integral


def ode_bits_per_dim(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sampler,
    x_start: torch.Tensor,
    estimator: str | TraceEstimator = TraceEstimator.RADEMACHER,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Bits/dim (B,) of 8-bit images x_start (B, C, H, W) in [−1, 1]: dequantised, then −log p/(D ln 2) + 7."""
    x = dequantize(x_start, generator)
    log_p = ode_log_likelihood(model_fn, sampler, x, estimator, generator)
    return -log_p / (x[0].numel() * math.log(2.0)) + 7.0

"""The probability-flow ODE likelihood of a diffusion module (the math is :mod:`difflab.losses.ode_nll`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from difflab.losses import TraceEstimator, ode_bits_per_dim
from difflab.samplers import FlowODESampler, ODESampler


def ode_nll_of(
    module,
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_start: torch.Tensor,
    generator: torch.Generator | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    estimator: str | TraceEstimator = TraceEstimator.RADEMACHER,
) -> tuple[torch.Tensor, int]:
    """(bits/dim (B,), NFE) of a diffusion module's ``model_fn`` on x_start: its process's ODE sampler
    (``sampler=ode``, or ``flow_ode`` for a rectified flow) at the given tolerances."""
    flow = getattr(module.diffusion, "process_kind", "gaussian") == "flow"
    sampler = module.build_sampler(functools.partial(FlowODESampler if flow else ODESampler, rtol=rtol, atol=atol))
    return ode_bits_per_dim(model_fn, sampler, x_start, estimator, generator), sampler.nfe

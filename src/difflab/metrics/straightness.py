"""Straightness of a flow's ODE trajectories (Liu et al. 2022, Definition 3.6 / eq. 6):

    S(Z) = ∫_0^1 E ‖(Z_1 − Z_0) − Ż_t‖² dt,

zero exactly when every trajectory is a straight line travelled at constant speed (then one Euler step is exact).
Here, in difflab's direction (τ from 1 = noise to 0 = data, dx/dτ = v̂): the trajectory of N Euler steps from ε
ends at x̂_0, and S = Σ_i |Δτ_i| · mean ‖(ε − x̂_0) − v̂_i‖², with ‖·‖² averaged over the C·H·W dimensions (so values
compare across image sizes; Liu et al. sum them) and the mean over samples.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from difflab.samplers import FlowEulerSampler


@torch.no_grad()
def straightness(
    module: Any,
    num_samples: int = 256,
    steps: int = 100,
    generator: torch.Generator | None = None,
    guidance_scale: float | None = None,
) -> dict[str, float]:
    """S of ``module`` (a flow's DiffusionModule) over ``num_samples`` trajectories of ``steps`` Euler steps, in
    batches of ``module.sample_batch_size``; class-conditional models cycle the classes, guided by
    ``guidance_scale`` (default: the model's w). Returns ``{"straightness": S, "straightness_steps": steps}``."""
    if getattr(module.diffusion, "process_kind", "gaussian") != "flow":
        raise ValueError(
            f"metrics=[straightness]: the model's process is {type(module.diffusion).__name__}; straightness is "
            "defined for rectified flows (model=rectified_flow)"
        )
    sampler = module.build_sampler(functools.partial(FlowEulerSampler, steps=steps))
    w = module.guidance_scale if guidance_scale is None else guidance_scale
    total, was_training = 0.0, module.training
    module.eval()
    for start in range(0, num_samples, module.sample_batch_size):
        n = min(module.sample_batch_size, num_samples - start)
        y = (torch.arange(start, start + n) % module.num_classes).to(module.device) if module.num_classes else None
        noise = torch.randn((n, *module.image_shape), generator=generator, device=module.device)
        with module.sampling_precision():
            total += trajectory_straightness(module.model_fn(y, w), sampler, noise).sum().item()
    module.train(was_training)
    return {"straightness": total / num_samples, "straightness_steps": steps}


def trajectory_straightness(model_fn, sampler: FlowEulerSampler, noise: torch.Tensor) -> torch.Tensor:
    """S per trajectory (B,) of ``sampler`` (Euler) from ``noise`` (B, C, H, W): the velocities v̂_i are the Euler
    increments (x_{i+1} − x_i)/(τ_{i+1} − τ_i)."""
    sampler.set_timesteps()
    x, velocities = noise, []
    for i, t in enumerate(sampler.timesteps.tolist()):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=sampler.timesteps.dtype)
        x_next = sampler.step(model_fn(x, t_batch), t, x).prev_sample
        d_tau = float(sampler.sigmas[i + 1] - sampler.sigmas[i])
        velocities.append(((x_next - x) / d_tau, abs(d_tau)))
        x = x_next
    chord = noise - x
    return sum(w * (chord - v).pow(2).flatten(1).mean(1) for v, w in velocities)

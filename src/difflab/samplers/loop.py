"""The generic reverse-process loop shared by every sampler."""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.samplers.base import Sampler

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_loop(
    model_fn: ModelFn,
    sampler: Sampler,
    shape: tuple[int, ...],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    num_steps: int | None = None,
    noise: torch.Tensor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Draw x_T ~ N(0, σ_0² I) of ``shape`` (B, C, H, W) and run the sampler's steps down to x_0.

    ``model_fn(x_t, t)`` gets t as a (B,) tensor of the sampler's timesteps (long for the discrete samplers, float
    for the continuous-time solvers, whose σ steps fall between the model's timesteps) and returns the raw network
    output. ``generator`` must live on ``device``; with it the result is reproducible. Each call of ``model_fn`` is
    one network evaluation: ``sampler.nfe`` counts them (a guided 2B batch counts once), and ``on_step(nfe)`` is
    called after each step (progress bars).
    """
    sampler.set_timesteps(num_steps)
    if noise is None:  # x_T ~ N(0, σ_0² I): σ_0 = 1 but for σ processes (init_noise_sigma, as diffusers)
        noise = torch.randn(shape, generator=generator, device=device) * sampler.init_noise_sigma
    x = noise
    if hasattr(sampler, "integrate"):  # an adaptive ODE solver picks its own steps (samplers/ode.py)
        return sampler.integrate(model_fn, x)
    for t in sampler.timesteps.tolist():
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=sampler.timesteps.dtype)
        model_output = model_fn(x, t_batch)
        sampler.nfe += 1
        x = sampler.step(model_output, t, x, generator=generator).prev_sample
        if on_step is not None:
            on_step(sampler.nfe)
    return x

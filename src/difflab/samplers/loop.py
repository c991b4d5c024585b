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


@torch.no_grad()
def draws_noise(
    sampler: Sampler, image_shape: tuple[int, ...], out_channels: int | None = None, num_steps: int | None = None
) -> bool:
    """Whether a chain of ``sampler`` (``num_steps`` steps) draws random numbers after its start x_T, i.e. whether
    x_0 is NOT a deterministic function of x_T (ancestral DDPM, DDIM with η > 0, the SDE and Langevin solvers, EDM's
    churn, multistep consistency sampling). A behavioural probe, not a list of classes, so a new sampler is judged by
    what it does: the chain runs from x_T = 0 of ``image_shape`` (C, H, W), batch 1, with a network that returns
    zeros of ``out_channels`` channels (default C; 2C for a learned variance), under a fresh generator; any draw from
    that generator or from torch's global one counts. A chain whose noisy steps all have zero variance (one DDPM step
    from t = T) is deterministic, and reported so."""
    channels, *size = image_shape
    out_channels = out_channels or channels
    zeros = lambda x, t: torch.zeros((x.shape[0], out_channels, *size))  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    before, global_before = generator.get_state(), torch.random.get_rng_state()
    try:
        sample_loop(
            zeros, sampler, (1, *image_shape), generator, num_steps=num_steps, noise=torch.zeros(1, *image_shape)
        )
    finally:
        drew_global = not torch.equal(global_before, torch.random.get_rng_state())
        torch.random.set_rng_state(global_before)
    return drew_global or not torch.equal(before, generator.get_state())

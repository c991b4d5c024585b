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
) -> torch.Tensor:
    """Draw x_T ~ N(0, I) of ``shape`` (B, C, H, W) and run the sampler's steps down to x_0.

    ``model_fn(x_t, t)`` gets t as a (B,) long tensor of original timesteps and returns the raw network output.
    ``generator`` must live on ``device``; with it the result is reproducible.
    """
    sampler.set_timesteps(num_steps)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=device)
    x = noise
    for t in sampler.timesteps.tolist():
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x = sampler.step(model_fn(x, t_batch), t, x, generator=generator).prev_sample
    return x

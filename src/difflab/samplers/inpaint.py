"""Inpainting by replacement (Song et al. 2021's "imputation", RePaint: Lugmayr et al. 2022) over the sampler contract.

At every reverse step the known region is replaced by the reference noised to the step's level:

    x_{t−1} ← m ⊙ q_sample(x_0^ref, t−1) + (1 − m) ⊙ x_{t−1},      m = 1 on the known pixels,

and at the last step (t − 1 = "−1", the data) by x_0^ref itself, so the known region is exact at t = 0.
RePaint's resampling (``jump_length`` j, ``jump_n_sample`` r): at every j-th level the chain jumps j levels back up
with the forward process, x_{s'} = sqrt(ᾱ_{s'}/ᾱ_s) x_s + sqrt(1 − ᾱ_{s'}/ᾱ_s) z, one level at a time, and
denoises again, r − 1 times, so the generated region is harmonised with the known one.

The wrapped sampler must be stateless between steps (its step from τ_i depends only on x_{τ_i} and the model
output), since the chain revisits levels: the DDPM ancestral sampler (RePaint's) and DDIM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.samplers.ancestral import AncestralSampler
from difflab.samplers.base import Sampler
from difflab.samplers.ddim import DDIMSampler

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
STATELESS = (AncestralSampler, DDIMSampler)


def check_revisitable(sampler: Sampler, mode: str) -> None:
    """Refuse samplers whose steps keep state (multistep solvers) or that must visit their levels in order."""
    if not isinstance(sampler, STATELESS):
        raise ValueError(
            f"mode={mode}: the sampler {type(sampler).__name__} keeps state between steps (or checks their order), "
            "so it cannot restart mid-chain or revisit levels; use sampler=ddpm (RePaint's) or sampler=ddim"
        )


def repaint_schedule(num_steps: int, jump_length: int = 1, jump_n_sample: int = 1) -> list[int]:
    """RePaint's time schedule over step indices K−1 … 0 of the sampler's sequence, ending at −1 (the data).

    Consecutive entries differ by one: a decrease is a denoising step from that index, an increase a forward
    (noising) step. From the index i it starts at K−1; when it reaches a multiple of ``jump_length`` below
    K − jump_length, it goes ``jump_length`` levels back up, ``jump_n_sample`` − 1 times in all per such level.
    The same list as ``get_schedule_jump_paper`` (and ``get_schedule_jump`` with n_sample = 1 and the second and
    third jumps off) of the authors' ``guided_diffusion/scheduler.py`` for t_T = K.
    """
    if num_steps < 1 or jump_length < 1 or jump_n_sample < 1:
        raise ValueError(
            f"RePaint schedule: steps={num_steps}, resample_jumps={jump_length}, resample_times={jump_n_sample}: "
            "expected integers >= 1 (resample_times=1: no resampling)"
        )
    jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
    t, times = num_steps, []
    while t >= 1:
        t -= 1
        times.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                times.append(t)
    return [*times, -1]


def noise_level_up(sampler: Sampler, x: torch.Tensor, i: int, generator: torch.Generator | None) -> torch.Tensor:
    """q(x_{τ_{i+1}} | x_{τ_i}) of the respaced chain (ᾱ_{τ_{−1}} = 1): one forward jump of RePaint's schedule."""
    ab = sampler.diffusion.alphas_cumprod_64
    ab_from = 1.0 if i < 0 else float(ab[sampler.timesteps.flip(0)[i]])
    ratio = float(ab[sampler.timesteps.flip(0)[i + 1]]) / ab_from
    z = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return (ratio**0.5 * x.float() + (1.0 - ratio) ** 0.5 * z).to(x.dtype)


def known_at(sampler: Sampler, x_ref: torch.Tensor, i: int, generator: torch.Generator | None) -> torch.Tensor:
    """q_sample(x_0^ref, τ_i) with fresh noise; x_0^ref itself for i = −1."""
    if i < 0:
        return x_ref
    t = sampler.timesteps.flip(0)[i].to(x_ref.device).expand(x_ref.shape[0])
    z = torch.randn(x_ref.shape, generator=generator, device=x_ref.device, dtype=x_ref.dtype)
    return sampler.diffusion.q_sample(x_ref, t, z)


@torch.no_grad()
def inpaint_loop(
    model_fn: ModelFn,
    sampler: Sampler,
    x_ref: torch.Tensor,
    known: torch.Tensor,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
    jump_length: int = 1,
    jump_n_sample: int = 1,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fill the unknown region of x_ref (B, C, H, W) where ``known`` (B or 1, 1 or C, H, W) is 0.

    ``known`` is 1 on the pixels to keep (binary). Starts from ``noise`` (default N(0, I) from ``generator``) at the
    sampler's first level and follows :func:`repaint_schedule`; ``jump_n_sample`` = 1 is plain replacement.
    Returns x_0 (B, C, H, W), equal to x_ref where known. ``sampler.nfe`` counts the network evaluations.
    """
    check_revisitable(sampler, "inpaint")
    sampler.set_timesteps(num_steps)
    K = len(sampler.timesteps)
    schedule = repaint_schedule(K, jump_length, jump_n_sample)
    ascending = sampler.timesteps.flip(0)
    known = known.to(x_ref.dtype)
    x = torch.randn(x_ref.shape, generator=generator, device=x_ref.device) if noise is None else noise
    for i, j in zip(schedule[:-1], schedule[1:], strict=True):
        if j > i:  # RePaint's "undo": back up one level with the forward process
            x = noise_level_up(sampler, x, i, generator)
            continue
        t = int(ascending[i])
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=sampler.timesteps.dtype)
        x = sampler.step(model_fn(x, t_batch), t, x, generator=generator).prev_sample
        sampler.nfe += 1
        x = known * known_at(sampler, x_ref, j, generator) + (1 - known) * x
    return x

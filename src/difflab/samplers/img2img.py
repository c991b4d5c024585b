"""Image-to-image (SDEdit, Meng et al. 2022): start the reverse chain from a given image at strength s ∈ [0, 1].

The chain runs the sampler's steps τ with τ + 1 ≤ s·T (0-based τ; the paper's t_s = s·T), starting at the largest
of them, τ_s, from
  ``noise``   x_{τ_s} = q_sample(x_0^ref, τ_s) = sqrt(ᾱ) x_0^ref + sqrt(1 − ᾱ) z  (SDEdit; at s = 1 the pure noise z
              the unconditional chain starts from: the input is then ignored, as in generation);
  ``invert``  x_{τ_s} = DDIM's deterministic inversion of x_0^ref up to τ_s (Song et al. §4.3; with η = 0 decoding,
              an encode-decode that an edit of the condition changes only where it must).
s = 0 runs no step and returns x_0^ref. The sampler restarts mid-chain, so it must be stateless between steps
(:func:`difflab.samplers.inpaint.check_revisitable`: ddpm, ddim).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.samplers.base import Sampler
from difflab.samplers.ddim import DDIMSampler
from difflab.samplers.inpaint import check_revisitable
from difflab.utils.enums import StrEnumChoice, parse_enum

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Img2ImgStart(StrEnumChoice):
    NOISE = "noise"
    INVERT = "invert"


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(
            f"strength={strength!r}: expected a number in [0, 1] (t_s = strength · T; 0 returns the input)"
        )
    return float(strength)


def strength_steps(sampler: Sampler, strength: float) -> torch.Tensor:
    """The sampler's timesteps (descending) that an img2img chain of ``strength`` runs: those with τ + 1 ≤ s·T."""
    limit = check_strength(strength) * sampler.num_timesteps + 1e-6
    return sampler.timesteps[sampler.timesteps.to(torch.float64) + 1 <= limit]


@torch.no_grad()
def img2img_loop(
    model_fn: ModelFn,
    sampler: Sampler,
    x_ref: torch.Tensor,
    strength: float,
    start: str | Img2ImgStart = Img2ImgStart.NOISE,
    generator: torch.Generator | None = None,
    num_steps: int | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_0 (B, C, H, W) edited from x_ref (B, C, H, W) at ``strength`` (see the module docstring).

    ``noise`` (default N(0, I) from ``generator``) is the z of the noise start (drawn before any step, so strength 1
    with the same generator reproduces :func:`difflab.samplers.sample_loop`). ``sampler.nfe`` counts evaluations
    of the reverse chain (the inversion's are not counted).
    """
    check_revisitable(sampler, "img2img")
    start = parse_enum(Img2ImgStart, start, "start")
    sampler.set_timesteps(num_steps)
    steps = strength_steps(sampler, strength)
    if start is Img2ImgStart.NOISE and noise is None:
        noise = torch.randn(x_ref.shape, generator=generator, device=x_ref.device)
    if steps.numel() == 0:
        return x_ref
    t_s = int(steps[0])
    if start is Img2ImgStart.INVERT:
        if not isinstance(sampler, DDIMSampler):
            raise ValueError("start=invert: DDIM inversion needs sampler=ddim (η = 0 for a faithful encode-decode)")
        x = sampler.encode(model_fn, x_ref, num_steps, num_levels=steps.numel())
        sampler.set_timesteps(num_steps)
    elif strength == 1.0:
        x = noise  # the generation chain's start (its first level is taken as the marginal at t = T)
    else:
        x = sampler.diffusion.q_sample(x_ref, torch.full((x_ref.shape[0],), t_s, device=x_ref.device), noise)
    for t in steps.tolist():
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=sampler.timesteps.dtype)
        x = sampler.step(model_fn(x, t_batch), t, x, generator=generator).prev_sample
        sampler.nfe += 1
    return x

"""Samplers of the reverse process, sharing the diffusers-style ``set_timesteps`` / ``step`` contract."""

from difflab.samplers.ancestral import AncestralSampler
from difflab.samplers.base import Sampler, SamplerOutput, Spacing, spaced_timesteps
from difflab.samplers.ddim import DDIMSampler, DDIMSigma
from difflab.samplers.loop import sample_loop

__all__ = [
    "AncestralSampler",
    "DDIMSampler",
    "DDIMSigma",
    "Sampler",
    "SamplerOutput",
    "Spacing",
    "sample_loop",
    "spaced_timesteps",
]

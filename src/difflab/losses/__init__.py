"""Training objectives and timestep samplers."""

from difflab.losses.simple import SimpleLoss
from difflab.losses.timesteps import TimestepSampler, UniformTimestepSampler

__all__ = ["SimpleLoss", "TimestepSampler", "UniformTimestepSampler"]

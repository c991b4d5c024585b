"""Training objectives, VLB terms, NLL evaluation and timestep samplers."""

from difflab.losses.nll import full_chain_bpd
from difflab.losses.objective import DiffusionLoss, LossType
from difflab.losses.timesteps import LossAwareTimestepSampler, TimestepSampler, UniformTimestepSampler
from difflab.losses.vlb import (
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    vlb_term,
)

__all__ = [
    "DiffusionLoss",
    "LossAwareTimestepSampler",
    "LossType",
    "TimestepSampler",
    "UniformTimestepSampler",
    "discretized_gaussian_log_likelihood",
    "full_chain_bpd",
    "normal_kl",
    "prior_bpd",
    "vlb_term",
]

"""Training objectives, VLB terms, NLL evaluation and timestep samplers."""

from difflab.losses.autoencoder import AutoencoderLoss, adaptive_weight, hinge_d_loss
from difflab.losses.flow_timesteps import FlowTimestepSampler, TimeDistribution
from difflab.losses.nll import full_chain_bpd
from difflab.losses.objective import DiffusionLoss, LossType
from difflab.losses.ode_nll import TraceEstimator, ode_bits_per_dim, ode_log_likelihood
from difflab.losses.sigmas import SigmaSampler
from difflab.losses.timesteps import LossAwareTimestepSampler, TimestepSampler, UniformTimestepSampler
from difflab.losses.vlb import (
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    vlb_term,
)

__all__ = [
    "AutoencoderLoss",
    "DiffusionLoss",
    "FlowTimestepSampler",
    "LossAwareTimestepSampler",
    "LossType",
    "SigmaSampler",
    "TimeDistribution",
    "TraceEstimator",
    "TimestepSampler",
    "UniformTimestepSampler",
    "adaptive_weight",
    "discretized_gaussian_log_likelihood",
    "full_chain_bpd",
    "hinge_d_loss",
    "normal_kl",
    "ode_bits_per_dim",
    "ode_log_likelihood",
    "prior_bpd",
    "vlb_term",
]

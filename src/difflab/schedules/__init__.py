"""Noise schedules and the Gaussian diffusion process math (imports nothing of ours but utils)."""

from difflab.schedules.betas import BetaSchedule, make_betas
from difflab.schedules.continuous import (
    ContinuousSchedule,
    NoiseLevel,
    eps_from_x0,
    output_from_x0_eps,
    score,
    x0_eps_from_output,
)
from difflab.schedules.diffusion import GaussianDiffusion, model_log_variance, posterior_terms
from difflab.schedules.edm import Preconditioning, SigmaProcess, ncsn_sigma_max
from difflab.schedules.flow import RectifiedFlow, flow_times, shift_time
from difflab.schedules.parameterization import Parameterization, VarianceType

__all__ = [
    "BetaSchedule",
    "ContinuousSchedule",
    "GaussianDiffusion",
    "NoiseLevel",
    "Parameterization",
    "Preconditioning",
    "RectifiedFlow",
    "SigmaProcess",
    "VarianceType",
    "eps_from_x0",
    "flow_times",
    "make_betas",
    "ncsn_sigma_max",
    "output_from_x0_eps",
    "model_log_variance",
    "posterior_terms",
    "score",
    "shift_time",
    "x0_eps_from_output",
]

"""Noise schedules and the Gaussian diffusion process math (imports nothing of ours but utils)."""

from difflab.schedules.betas import BetaSchedule, make_betas
from difflab.schedules.diffusion import GaussianDiffusion, model_log_variance, posterior_terms
from difflab.schedules.parameterization import Parameterization, VarianceType

__all__ = [
    "BetaSchedule",
    "GaussianDiffusion",
    "Parameterization",
    "VarianceType",
    "make_betas",
    "model_log_variance",
    "posterior_terms",
]

"""Samplers of the reverse process, sharing the diffusers-style ``set_timesteps`` / ``step`` contract."""

from difflab.samplers.ancestral import AncestralSampler
from difflab.samplers.base import Sampler, SamplerOutput, Spacing, spaced_timesteps
from difflab.samplers.consistency import ConsistencySampler
from difflab.samplers.continuous import ContinuousSampler, SigmaSchedule, solver_sigmas
from difflab.samplers.ddim import DDIMSampler, DDIMSigma
from difflab.samplers.dpmpp import DPMSolverMultistepSampler
from difflab.samplers.dpmpp_sde import DPMSolverSDESampler
from difflab.samplers.edm import EDMSampler
from difflab.samplers.euler import EulerSampler
from difflab.samplers.euler_ancestral import EulerAncestralSampler
from difflab.samplers.euler_maruyama import EulerMaruyamaSampler
from difflab.samplers.flow import FlowEulerSampler, FlowHeunSampler, FlowSampler
from difflab.samplers.heun import HeunSampler
from difflab.samplers.langevin import AnnealedLangevinSampler, PredictorCorrectorSampler
from difflab.samplers.lcm import LCMSampler
from difflab.samplers.loop import draws_noise, sample_loop
from difflab.samplers.ode import FlowODESampler, ODESampler
from difflab.samplers.pndm import PNDMSampler
from difflab.samplers.unipc import UniPCSampler

__all__ = [
    "AnnealedLangevinSampler",
    "AncestralSampler",
    "ConsistencySampler",
    "ContinuousSampler",
    "DDIMSampler",
    "DDIMSigma",
    "DPMSolverMultistepSampler",
    "DPMSolverSDESampler",
    "EDMSampler",
    "EulerAncestralSampler",
    "EulerMaruyamaSampler",
    "EulerSampler",
    "LCMSampler",
    "FlowEulerSampler",
    "FlowHeunSampler",
    "FlowODESampler",
    "FlowSampler",
    "HeunSampler",
    "ODESampler",
    "PNDMSampler",
    "PredictorCorrectorSampler",
    "Sampler",
    "SamplerOutput",
    "SigmaSchedule",
    "Spacing",
    "UniPCSampler",
    "draws_noise",
    "sample_loop",
    "solver_sigmas",
    "spaced_timesteps",
]

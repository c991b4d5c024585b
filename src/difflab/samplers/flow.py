"""Euler and Heun for rectified flows: dx/dτ = v̂(x, τ) from τ = 1 (noise) to τ = 0, on uniform or shifted times.

With x_τ = x̂_0 + τ v̂ the flow ODE has the form of the variance-exploding ODE dx̃/dσ = ε̂ that
:class:`~difflab.samplers.EulerSampler` and :class:`~difflab.samplers.HeunSampler` integrate (σ = τ, α = 1, v̂ in ε̂'s
place), so their updates are reused as they are:
    Euler   x_{i+1} = x_i + (τ_{i+1} − τ_i) v̂_i = x̂_0 + τ_{i+1} v̂_i                   (Liu et al. 2022, Alg. 1)
    Heun    the same predictor, then x_i + Δτ (v̂_i + v̂(x', τ_{i+1}))/2; the last step to τ = 0 stays Euler
            (NFE = 2N − 1; diffusers' FlowMatchHeunDiscreteScheduler)
Times: Euler τ_i = 1 − i/N (Liu et al.; one step is 1 → 0), Heun τ_i = linspace(1, 1/T, N), both shifted by SD3's
τ' = α τ/(1 + (α − 1) τ) (``shift`` = α; :func:`flow_times`). Heun's grid ends at the smallest training time 1/T,
not at 1/N, because its last step is Euler: an Euler step over [0, τ_{N−1}] returns x̂_0 = E[x_0 | x_τ], which shrinks
the spread (on N(0, 0.3²) data with the exact velocity, N = 10, shift 3: std 0.206 and worst error 0.41 on a grid
ending at 1/N; 0.303 and 0.007 on this one). diffusers ends at shift(1/T) and then shifts it again. The network sees
t = T·τ. Thresholding (``clip_denoised``, ``dynamic_threshold``) clamps x̂_0 and recomputes v̂ = (x − x̂_0)/τ.
"""

from __future__ import annotations

import torch

from difflab.samplers.continuous import ContinuousSampler, SigmaSchedule
from difflab.samplers.euler import EulerSampler
from difflab.samplers.heun import HeunSampler
from difflab.samplers.thresholding import dynamic_threshold
from difflab.schedules import NoiseLevel, flow_times, shift_time


class FlowSampler(ContinuousSampler):
    """Base of the flow samplers. ``shift``: SD3's timestep shift α (1: uniform steps). The other arguments as
    :class:`~difflab.samplers.Sampler`; ``clip_denoised`` defaults to false (the ODE's own endpoint)."""

    process_kinds = ("flow",)

    def __init__(self, *args, shift: float = 1.0, **kwargs) -> None:
        if shift <= 0:
            raise ValueError(f"sampler.shift={shift}: expected > 0 (1: uniform steps; SD3 uses 3 at 1024²)")
        self.shift = float(shift)
        kwargs.setdefault("clip_denoised", False)
        super().__init__(*args, **kwargs)

    def check_process(self, diffusion) -> None:
        if self.sigma_schedule is not SigmaSchedule.MODEL or self.sigma_min is not None or self.sigma_max is not None:
            raise ValueError(
                "sampler.sigma_schedule/sigma_min/sigma_max: the σ steps of the diffusion solvers; a flow sampler "
                "steps uniformly in τ ∈ [1, 0], changed by sampler.shift"
            )

    def levels_for(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(τ_0 … τ_{N−1}, their network timesteps T·τ), (N,) float64 each."""
        taus = flow_times(num_steps, self.shift)[:-1]
        return taus, taus * self.diffusion.num_timesteps

    def level(self, sigma: float) -> NoiseLevel:
        """The flow at τ = ``sigma`` as the solvers read it: x = x̂_0 + τ v̂ (α = 1, σ = τ)."""
        return NoiseLevel(alpha=1.0, std=sigma, recip_alpha=1.0, sigma=sigma)

    def predict_at(
        self, model_output: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel, clip: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(x̂_0, v̂, None) in fp32 at τ = ``level.sigma`` > 0, thresholded as configured."""
        x_t = x_t.float()
        x0, velocity = self.diffusion.x0_velocity(self.parameterization, model_output.float(), x_t, level.sigma)
        if self.clip_denoised if clip is None else clip:
            threshold = self.dynamic_threshold
            x0 = x0.clamp(-1.0, 1.0) if threshold is None else dynamic_threshold(x0, threshold)
            velocity = (x_t - x0) / level.sigma
        return x0, velocity, None


class FlowEulerSampler(FlowSampler, EulerSampler):
    """``sampler=flow_euler``: Euler on the flow ODE, one network evaluation per step."""


class FlowHeunSampler(FlowSampler, HeunSampler):
    """``sampler=flow_heun``: Heun (trapezoidal corrector) on the flow ODE; NFE = 2·steps − 1."""

    def levels_for(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(τ_0 … τ_{N−1}, T·τ): shift(linspace(1, 1/T, N)), so that the closing Euler step to τ = 0 is short (see
        the module docstring)."""
        taus = shift_time(torch.linspace(1.0, 1.0 / self.num_timesteps, num_steps, dtype=torch.float64), self.shift)
        return taus, taus * self.num_timesteps

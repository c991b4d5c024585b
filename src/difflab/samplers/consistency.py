"""Multistep consistency sampling (Song et al. 2023, Algorithm 1; diffusers' ``CMStochasticIterativeScheduler``).

    x̃ ← σ_max z;  x̂ ← f(x̃, σ_max)
    for τ = τ_1 > τ_2 > … :   x̃ ← x̂ + sqrt(τ² − σ_min²) z;   x̂ ← f(x̃, τ)
    return x̂
with f the consistency function of :mod:`difflab.schedules.consistency` (its σ_min, σ_max, σ_d): one network
evaluation per point, NFE = steps. The points are ``sigmas`` (the whole list, σ_max first; CM tunes τ_1 by a
greedy search, e.g. 0.821 for 2 steps on CIFAR-10) or, with ``steps`` alone, the first ``steps`` points of a
Karras grid of steps + 1 from σ_max to σ_min (:meth:`ConsistencyFunction.sampling_sigmas`; the last point, σ_min,
would add no noise and change nothing). diffusers instead picks evenly spaced indices of its 40-point training grid.

A consistency model (``model=consistency``) gives the sampler its own f; any other model of a Gaussian or σ
process samples with f built from its denoiser over its own σ range (σ_d = 0.5): "consistency sampling" of an
ordinary diffusion model, a multistep x̂_0 sampler. The loop's x is the model's x_t (x̃ = x_t/α_t for a discrete
model); the chain's first noise has the standard deviation of α σ_0 (``init_noise_sigma``).
"""

from __future__ import annotations

import math

import torch

from difflab.samplers.base import Sampler, SamplerOutput
from difflab.schedules.consistency import ConsistencyFunction
from difflab.schedules.continuous import NoiseLevel, x0_eps_from_output


class ConsistencySampler(Sampler):
    """``sampler=consistency``. Extra arguments (the others as :class:`Sampler`; ``clip_denoised`` clamps each x̂ to
    [−1, 1] as diffusers' ``clip_denoised``):

    sigmas: the σ of each step, descending, within [σ_min, σ_max] of the model's consistency function (null: the
        automatic choice for ``steps``). steps: the number of steps (default: len(sigmas), else 1).
    s_noise: scale of the noise added between steps (1: Algorithm 1; diffusers' ``s_noise``).
    """

    process_kinds = ("gaussian", "sigma")

    def __init__(self, *args, sigmas: list[float] | None = None, s_noise: float = 1.0, **kwargs) -> None:
        diffusion = kwargs.get("diffusion", args[0] if args else None)
        self.check_process_kind(diffusion)
        self.function = ConsistencyFunction.for_process(diffusion)
        self.custom = None if sigmas is None else [float(s) for s in sigmas]
        if self.custom is not None:
            if not self.custom or any(b >= a for a, b in zip(self.custom, self.custom[1:], strict=False)):
                raise ValueError(f"sampler.sigmas={sigmas}: expected a non-empty, strictly descending list")
            steps = kwargs.get("steps")
            if steps is not None and steps != len(self.custom):
                raise ValueError(f"sampler.steps={steps} with sampler.sigmas of {len(self.custom)} points: set one")
            kwargs["steps"] = len(self.custom)
        kwargs.setdefault("steps", 1)
        if not s_noise > 0:
            raise ValueError(f"sampler.s_noise={s_noise}: expected > 0")
        self.s_noise = float(s_noise)
        super().__init__(*args, **kwargs)

    def bind(self, function: ConsistencyFunction) -> ConsistencySampler:
        """Sample with the model's own consistency function (its σ_min, σ_max, σ_d): a consistency model's."""
        self.function = function
        self.set_timesteps(self.num_steps)
        return self

    def num_evaluations(self, num_steps: int | None = None) -> int:
        return self.num_steps if num_steps is None else num_steps

    def set_timesteps(self, num_steps: int | None = None) -> None:
        num_steps = self.num_steps if num_steps is None else num_steps
        if num_steps < 1:
            raise ValueError(f"sampler.steps={num_steps}: expected >= 1")
        self.sigmas = self.points(num_steps)
        self.timesteps = self.diffusion.continuous.sigma_to_t(self.sigmas).float()
        self._t_host = self.timesteps.tolist()
        on_sigma = getattr(self.diffusion, "process_kind", "gaussian") == "sigma"
        levels = [self.diffusion.level(s) if on_sigma else NoiseLevel.from_sigma(s) for s in self.sigmas.tolist()]
        self.levels = levels  # Python floats: x_t = α x̃ at each point
        self.init_noise_sigma = levels[0].std  # std of α σ_0 z: σ_0 for a σ process
        self.nfe, self._eval = 0, 0

    def points(self, num_steps: int) -> torch.Tensor:
        """The chain's σ (num_steps,) float64, descending, checked against the consistency function's range."""
        f = self.function
        if self.custom is None:
            return f.sampling_sigmas(num_steps)
        if num_steps != len(self.custom):
            raise ValueError(f"sampler.steps={num_steps}: sampler.sigmas has {len(self.custom)} points; set one")
        if not f.sigma_min * (1 - 1e-6) <= min(self.custom) and max(self.custom) <= f.sigma_max * (1 + 1e-6):
            raise ValueError(
                f"sampler.sigmas={self.custom}: outside the model's consistency range [{f.sigma_min:.4g}, "
                f"{f.sigma_max:.4g}] (its sigma_min, sigma_max)"
            )
        return torch.tensor(self.custom, dtype=torch.float64)

    def _on_set_timesteps(self, ascending: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError("ConsistencySampler overrides set_timesteps")

    def step(
        self,
        model_output: torch.Tensor,
        t: float | torch.Tensor,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        k = self._advance(t)
        dtype = torch.promote_types(x_t.dtype, torch.float32)  # float64 inputs stay float64 (parity tests)
        level, x_in = self.levels[k], x_t.to(dtype)
        x0 = x0_eps_from_output(self.parameterization, model_output.to(dtype), x_in, level)[0]
        x_hat = self.function(x_in * level.recip_alpha, x0, level.sigma)
        if self.clip_denoised:
            x_hat = x_hat.clamp(-1.0, 1.0)
        if k + 1 == len(self.sigmas):
            return SamplerOutput(prev_sample=x_hat.to(x_t.dtype), pred_x0=x_hat)
        tau = float(self.sigmas[k + 1])
        spread = math.sqrt(max(tau**2 - self.function.sigma_min**2, 0.0)) * self.s_noise
        z = torch.randn(x_hat.shape, generator=generator, device=x_hat.device, dtype=torch.float32).to(dtype)
        x_next = (x_hat + spread * z) * self.levels[k + 1].alpha
        return SamplerOutput(prev_sample=x_next.to(x_t.dtype), pred_x0=x_hat)

    def _advance(self, t: float | torch.Tensor) -> int:
        """The position of ``t`` in the chain (it must be the next one)."""
        k = self._eval
        if k >= len(self._t_host):
            raise ValueError("this chain is finished: call set_timesteps before sampling again")
        if abs(float(t) - self._t_host[k]) > 1e-3 * max(1.0, abs(self._t_host[k])):
            raise ValueError(f"step(t={float(t):.4f}): expected t={self._t_host[k]:.4f}, step {k} of this chain")
        self._eval += 1
        return k

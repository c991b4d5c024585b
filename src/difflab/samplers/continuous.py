"""What the continuous-time solvers share: σ steps, the network's timesteps for them, and the step bookkeeping.

A solver integrates from σ_0 = σ_max down to σ_N = 0 over N levels (``steps``) chosen by ``sigma_schedule``:
  model           the model's own timesteps, picked by ``spacing`` (even | leading | trailing | quadratic)
  karras          σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ   (Karras et al. 2022, eq. 5; ρ = 7)
  uniform_lambda  λ_i = −log σ_i uniform between λ(σ_max) and λ(σ_min)       (Lu et al. 2022, "logSNR" steps)
σ_min defaults to the model's σ at t = 0 (a smaller one is an error: the network never saw it); σ_max is an upper
bound, capped at the model's σ at t = T − 1 (null: that σ; EDM's 80 starts a cosine-schedule model, whose last σ is
2·10⁴, where the data is already drowned, instead of spending steps above it). Off-table σ reach the network as
fractional timesteps (log σ interpolated, :class:`ContinuousSchedule`).
The last level is σ = 0, the data: every solver's last step returns the x̂_0 of its last evaluation (the limit
λ → ∞ of each update; diffusers' ``final_sigmas_type="zero"``).

The loop's x is always the model's x_t (= α x_0 + s ε); solvers that work on x/α (Euler, Heun) convert at each step.
The solver math reads only the levels (:class:`NoiseLevel`: α, s, σ), so a process with other levels (a flow) can
reuse it by overriding :meth:`ContinuousSampler.levels_for`.
"""

from __future__ import annotations

import torch

from difflab.samplers.base import Sampler, SamplerOutput, check_steps, spaced_timesteps
from difflab.schedules import ContinuousSchedule, NoiseLevel
from difflab.schedules.sigma_paths import karras_sigmas
from difflab.utils.enums import StrEnumChoice, parse_enum


class SigmaSchedule(StrEnumChoice):
    MODEL = "model"
    KARRAS = "karras"
    UNIFORM_LAMBDA = "uniform_lambda"


def solver_sigmas(
    view: ContinuousSchedule,
    num_steps: int,
    schedule: SigmaSchedule,
    spacing: str,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ_i, t_i) for i = 0 … N−1, both (N,) float64, σ descending; the final σ_N = 0 is not included."""
    if schedule is SigmaSchedule.MODEL:
        t = spaced_timesteps(view.num_timesteps, num_steps, spacing).flip(0)
        return view.sigmas[t], t.to(torch.float64)
    lo, hi = sigma_range(view, sigma_min, sigma_max)
    if schedule is SigmaSchedule.KARRAS:
        sigmas = karras_sigmas(num_steps, lo, hi, rho)
    else:
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        sigmas = (torch.tensor(hi).log() + ramp * (torch.tensor(lo).log() - torch.tensor(hi).log())).exp()
    return sigmas, view.sigma_to_t(sigmas)


def sigma_range(view: ContinuousSchedule, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    """(σ_min, σ_max) of the karras/uniform_lambda steps: the model's ends, σ_max capped at the model's largest σ."""
    lo = view.sigma_min if sigma_min is None else float(sigma_min)
    hi = view.sigma_max if sigma_max is None else min(float(sigma_max), view.sigma_max)
    return lo, hi


def check_sigma_range(view: ContinuousSchedule, schedule: SigmaSchedule, sigma_min, sigma_max, rho: float) -> None:
    """Clear errors for σ bounds the model cannot take (construction time)."""
    if schedule is SigmaSchedule.MODEL and (sigma_min is not None or sigma_max is not None):
        raise ValueError(
            "sampler.sigma_min/sigma_max apply to sigma_schedule=karras|uniform_lambda; with sigma_schedule=model "
            "the steps are the model's own timesteps (choose them with sampler.spacing): set both to null"
        )
    if rho <= 0:
        raise ValueError(f"sampler.rho={rho}: expected > 0 (Karras et al. use 7)")
    where = (
        f"the model's schedule (T={view.num_timesteps}) has σ from {view.sigma_min:.4g} (t=0) "
        f"to {view.sigma_max:.4g} (t=T-1)"
    )
    if sigma_min is not None and not view.sigma_min * (1 - 1e-6) <= float(sigma_min) < view.sigma_max:
        raise ValueError(f"sampler.sigma_min={sigma_min}: outside the model's noise levels; {where}; null: t=0")
    if sigma_max is not None and float(sigma_max) <= view.sigma_min:
        raise ValueError(f"sampler.sigma_max={sigma_max}: below the model's smallest noise level; {where}")
    lo, hi = sigma_range(view, sigma_min, sigma_max)
    if not lo < hi:
        raise ValueError(f"sampler.sigma_min={lo:.4g} must be below sampler.sigma_max={hi:.4g} ({where})")


class ContinuousSampler(Sampler):
    """Base of the ODE/SDE solvers. Extra arguments (the others as :class:`Sampler`):

    sigma_schedule: ``model`` (default; ``spacing`` picks the model's timesteps) | ``karras`` | ``uniform_lambda``.
    rho: ρ of the Karras schedule. sigma_min, sigma_max: ends of the karras/uniform_lambda steps (None: the model's
    σ at t = 0 and t = T − 1; sigma_max is capped at the latter).

    Subclasses set ``min_steps`` and implement :meth:`solve` (one update, given x̂_0 and ε̂ of the evaluation);
    multistep state lives in ``self.state`` and is reset by ``set_timesteps``. ``timesteps`` (float32) are the
    network inputs, one per evaluation, in order.
    """

    min_steps = 1

    def __init__(
        self,
        *args,
        sigma_schedule: str | SigmaSchedule = SigmaSchedule.MODEL,
        rho: float = 7.0,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        **kwargs,
    ) -> None:
        self.sigma_schedule = parse_enum(SigmaSchedule, sigma_schedule, "sampler.sigma_schedule")
        self.rho, self.sigma_min, self.sigma_max = float(rho), sigma_min, sigma_max
        diffusion = kwargs.get("diffusion", args[0] if args else None)
        self.check_process_kind(diffusion)
        self.check_process(diffusion)
        super().__init__(*args, **kwargs)

    process_kinds = ("gaussian", "sigma")

    def check_process(self, diffusion) -> None:
        """Clear errors for settings the process cannot take (construction time)."""
        check_sigma_range(diffusion.continuous, self.sigma_schedule, self.sigma_min, self.sigma_max, self.rho)

    @property
    def on_sigma_process(self) -> bool:
        """Whether the model is a σ process (x̃ = x_0 + σ ε, timesteps are σ: EDM, VE, continuous VP)."""
        return getattr(self.diffusion, "process_kind", "gaussian") == "sigma"

    def levels_for(self, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(σ_0 … σ_{N−1}, their network timesteps), (N,) float64 each: the model's σ of ``sigma_schedule``
        (a σ process's ``model`` steps are its preconditioning's own, :meth:`SigmaProcess.sampling_sigmas`)."""
        if self.on_sigma_process and self.sigma_schedule is SigmaSchedule.MODEL:
            sigmas = self.diffusion.sampling_sigmas(num_steps, self.rho)
            return sigmas, sigmas.clone()
        return solver_sigmas(
            self.diffusion.continuous,
            num_steps,
            self.sigma_schedule,
            self.spacing,
            self.rho,
            self.sigma_min,
            self.sigma_max,
        )

    def set_timesteps(self, num_steps: int | None = None) -> None:
        num_steps = self.num_steps if num_steps is None else num_steps
        if getattr(self.diffusion, "process_kind", "gaussian") == "gaussian":  # σ and flow processes: any N
            check_steps(num_steps, self.num_timesteps)
        if num_steps < self.min_steps:
            raise ValueError(
                f"sampler.steps={num_steps}: {type(self).__name__}{self.describe()} needs steps >= {self.min_steps}"
            )
        sigmas, t = self.levels_for(num_steps)
        self.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])  # (N + 1,), last σ = 0
        self.init_noise_sigma = float(sigmas[0]) if self.on_sigma_process else 1.0
        self.levels = [self.level(float(s)) for s in self.sigmas]
        self.plan = self.evaluation_plan(num_steps)  # level index of each network evaluation
        self.timesteps = t[self.plan].float()
        self._t_host = self.timesteps.tolist()
        self.nfe, self.num_steps_run = 0, num_steps
        self._eval = 0
        self.state: dict = {}

    def level(self, sigma: float) -> NoiseLevel:
        """The :class:`NoiseLevel` the solver math reads at σ: variance preserving (α = 1/sqrt(1 + σ²)), or for a σ
        process x̃ = x_0 + σ ε (α = 1; a flow's likewise, σ = τ)."""
        return self.diffusion.level(sigma) if self.on_sigma_process else NoiseLevel.from_sigma(sigma)

    def network_timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The network's timestep of each σ (float64, same shape): the model's t(σ) (σ itself for a σ process)."""
        return self.diffusion.continuous.sigma_to_t(sigmas)

    def describe(self) -> str:
        """Extra text for error messages (e.g. the order)."""
        return ""

    def evaluation_plan(self, num_steps: int) -> list[int]:
        """The level of each network evaluation: one per level by default."""
        return list(range(num_steps))

    def num_evaluations(self, num_steps: int | None = None) -> int:
        return len(self.evaluation_plan(self.num_steps if num_steps is None else num_steps))

    def _on_set_timesteps(self, ascending: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError("the solvers override set_timesteps")

    def advance(self, t: float | torch.Tensor) -> int:
        """Check that ``t`` is the next evaluation of the chain and return its position in ``timesteps``."""
        k = self._eval
        if k >= len(self._t_host):
            raise ValueError("this chain is finished: call set_timesteps before sampling again")
        if abs(float(t) - self._t_host[k]) > 1e-3 * max(1.0, abs(self._t_host[k])):
            raise ValueError(
                f"step(t={float(t):.4f}): expected t={self._t_host[k]:.4f}, evaluation {k} of this chain; "
                "iterate over sampler.timesteps in order after set_timesteps"
            )
        self._eval += 1
        return k

    def step(
        self,
        model_output: torch.Tensor,
        t: float | torch.Tensor,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        i = self.plan[self.advance(t)]
        x0, eps, _ = self.predict_at(model_output, x_t, self.levels[i])  # fp32, thresholded as configured
        prev = self.solve(i, x_t.float(), x0, eps, generator)
        return SamplerOutput(prev_sample=prev.to(x_t.dtype), pred_x0=x0)

    def solve(
        self, i: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """The next x_t (fp32) from x = x_t at level i, with the evaluation's x̂_0 and ε̂ there."""
        raise NotImplementedError

    def noise(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """z ~ N(0, I) shaped like x (fp32), from ``generator``."""
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)

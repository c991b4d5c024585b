"""The probability-flow ODE with an adaptive solver (Song et al. 2021, §4.3: RK45), for sampling and likelihoods.

In x̃ = x_t/α_t the ODE is dx̃/dσ = ε̂(x̃, σ) (Karras et al. eq. 4; a flow: dx/dτ = v̂). It is integrated in
u = ln σ (dx̃/du = σ ε̂ = x̃ − x̂_0: smooth over EDM's five decades of σ) for the diffusion and σ processes, in u = τ
for flows, by torchdiffeq's ``dopri5`` (Dormand–Prince RK45, Song et al.'s solver, there scipy's RK45) at the given
``rtol``/``atol``. The solver picks its own steps, so the sampler does not keep the ``set_timesteps``/``step``
contract: :func:`~difflab.samplers.sample_loop` calls :meth:`ODESampler.integrate` instead, and ``nfe`` reports the
network evaluations the solver made (one per function evaluation; a guided 2B batch counts once).
Sampling goes from σ_max to σ_min (the model's ends, or ``sigma_min``/``sigma_max``) and, with ``denoise``, ends with
x̂_0 at σ_min (one more evaluation; score_sde's ``denoise``), else with x̃(σ_min).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from difflab.samplers.continuous import ContinuousSampler, sigma_range
from difflab.samplers.flow import FlowSampler

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ODESampler(ContinuousSampler):
    """``sampler=ode``: the probability-flow ODE by adaptive RK45 (``method``: any torchdiffeq method, default
    ``dopri5``), tolerances ``rtol``/``atol`` (Song et al.: 1e-5 both); ``denoise``: return x̂_0 at σ_min.
    ``sigma_min``/``sigma_max`` as the other solvers (the integration's ends); ``steps`` is unused."""

    def __init__(
        self, *args, rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5", denoise: bool = True, **kwargs
    ) -> None:
        if rtol <= 0 or atol <= 0:
            raise ValueError(f"sampler.rtol={rtol}, atol={atol}: expected > 0 (Song et al.: 1e-5)")
        self.rtol, self.atol, self.method, self.denoise = float(rtol), float(atol), str(method), bool(denoise)
        kwargs.setdefault("clip_denoised", False)
        kwargs.setdefault("steps", 1)
        super().__init__(*args, **kwargs)

    def set_timesteps(self, num_steps: int | None = None) -> None:
        """No fixed steps: ``timesteps`` is empty and ``nfe`` restarts; the ends are fixed here."""
        self.nfe, self.num_steps_run, self._eval, self.state = 0, 0, 0, {}
        self.timesteps = torch.empty(0)
        lo, hi = self.ends()
        self.u_end, self.u_start = self.to_u(lo), self.to_u(hi)
        self.init_noise_sigma = self.prior_std(hi)

    last_nfe = 0  # the network evaluations of the last finished solve

    def num_evaluations(self, num_steps: int | None = None) -> int:
        """Unknown before a solve: the last solve's count (0 before any; ``nfe`` counts the current one)."""
        return self.last_nfe

    # ------------------------------------------------------------------ the process, in the integration variable u
    def ends(self) -> tuple[float, float]:
        """(σ_min, σ_max) of the integration."""
        return sigma_range(self.diffusion.continuous, self.sigma_min, self.sigma_max)

    def to_u(self, sigma: float) -> float:
        return math.log(sigma)

    def sigma_of(self, u: float) -> tuple[float, float]:
        """(σ(u), dσ/du)."""
        sigma = math.exp(u)
        return sigma, sigma

    def prior_std(self, sigma_max: float) -> float:
        """The standard deviation of x at σ_max in the model's space: σ_max for a σ process (score_sde's VE prior),
        1 for the variance-preserving models (x_T ~ N(0, I), i.e. x̃ ~ N(0, (1 + σ²) I))."""
        return sigma_max if self.on_sigma_process else 1.0

    def prior_std_tilde(self, sigma_max: float) -> float:
        """The prior's standard deviation in x̃ (what the likelihood's change of variables reads)."""
        return self.prior_std(sigma_max) * float(self.level(sigma_max).recip_alpha)

    # ------------------------------------------------------------------ the vector field
    def evaluate(self, model_fn: ModelFn, sigma: float, x_tilde: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂_0, ε̂) at σ from one network evaluation of x̃ (B, C, H, W) in the model's space, fp32; counted in NFE."""
        level = self.level(sigma)
        x_model = x_tilde * level.alpha
        t = float(self.network_timesteps(torch.tensor(sigma, dtype=torch.float64)))
        t_batch = torch.full((x_tilde.shape[0],), t, device=x_tilde.device, dtype=torch.float32)
        self.nfe += 1
        x0, eps, _ = self.predict_at(model_fn(x_model, t_batch), x_model, level)
        return x0, eps

    def velocity(self, model_fn: ModelFn, u: float, x_tilde: torch.Tensor) -> torch.Tensor:
        """dx̃/du at x̃ (B, C, H, W), fp32: ε̂ dσ/du from one network evaluation."""
        sigma, dsigma = self.sigma_of(u)
        return self.evaluate(model_fn, sigma, x_tilde)[1] * dsigma

    def final(self, model_fn: ModelFn, x_tilde: torch.Tensor) -> torch.Tensor:
        """The sample at the end of the integration: x̂_0 there (``denoise``) or x̃ itself."""
        if not self.denoise:
            return x_tilde
        return self.evaluate(model_fn, self.sigma_of(self.u_end)[0], x_tilde)[0]

    def odeint(self, func, y0, u_from: float, u_to: float):
        """torchdiffeq's solution at ``u_to`` (the state may be a tuple of tensors)."""
        from torchdiffeq import odeint  # a core dependency; imported here to keep `import difflab` light

        grid = torch.tensor([u_from, u_to], dtype=torch.float64)
        solution = odeint(func, y0, grid, rtol=self.rtol, atol=self.atol, method=self.method)
        return tuple(s[-1] for s in solution) if isinstance(solution, tuple) else solution[-1]

    @torch.no_grad()
    def integrate(self, model_fn: ModelFn, x_T: torch.Tensor) -> torch.Tensor:
        """x_0 (B, C, H, W) from x_T in the model's space (σ_max), solved from σ_max down to σ_min."""
        x_tilde = x_T.float() * float(self.level(self.sigma_of(self.u_start)[0]).recip_alpha)
        func = lambda u, x: self.velocity(model_fn, float(u), x)  # noqa: E731
        x_tilde = self.odeint(func, x_tilde, self.u_start, self.u_end)
        x_0 = self.final(model_fn, x_tilde).to(x_T.dtype)
        self.last_nfe = self.nfe
        return x_0


class FlowODESampler(FlowSampler, ODESampler):
    """``sampler=flow_ode``: the rectified flow's ODE dx/dτ = v̂ by adaptive RK45, from τ = 1 to τ_min = 1/T (then
    x̂_0 there with ``denoise``, else the Euler step to τ = 0 that x̂_0 is)."""

    def ends(self) -> tuple[float, float]:
        return 1.0 / self.diffusion.num_timesteps, 1.0

    def to_u(self, sigma: float) -> float:
        return sigma

    def sigma_of(self, u: float) -> tuple[float, float]:
        return u, 1.0

    def network_timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas * self.diffusion.num_timesteps

    def prior_std(self, sigma_max: float) -> float:
        return 1.0

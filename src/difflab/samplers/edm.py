"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2): Heun's method with "churn".

Before each step i, noise raises σ_i to σ̂_i = (1 + γ_i) σ_i, γ_i = min(S_churn/N, √2 − 1) if S_tmin ≤ σ_i ≤ S_tmax
else 0, by
    x̃̂_i = x̃_i + sqrt(σ̂_i² − σ_i²) S_noise z                                            (Alg. 2, lines 5–6)
and the Heun step then goes from σ̂_i to σ_{i+1} (x̃ = x_t/α_t; the last step to σ = 0 stays Euler):
    x̃' = x̃̂_i + (σ_{i+1} − σ̂_i) d_i,   x̃_{i+1} = x̃̂_i + (σ_{i+1} − σ̂_i) (d_i + d(x̃', σ_{i+1}))/2.
S_churn = 0 is :class:`~difflab.samplers.HeunSampler` (Algorithm 1). NFE = 2N − 1. The network sees σ̂_i at the
predictor and σ_{i+1} at the corrector, so ``timesteps`` lists both, in evaluation order.

The churn noise of step i is added at the end of the evaluation before it (the contract's ``step`` returns the x the
next evaluation sees); the first step's, where x_0 is pure noise, is folded into the starting noise: the chain starts
at σ̂_0 (``init_noise_sigma``), which has the same law. σ̂ is capped at the largest σ of a discrete (VP) model,
whose network has no timestep beyond it.
EDM's settings: ImageNet-64 S_churn 40, S_tmin 0.05, S_tmax 50, S_noise 1.003 (256 steps); CIFAR-10 is best
deterministic (S_churn 0).
"""

from __future__ import annotations

import math

import torch

from difflab.samplers.base import SamplerOutput
from difflab.samplers.continuous import ContinuousSampler


class EDMSampler(ContinuousSampler):
    """``sampler=edm``: Algorithm 2. S_churn (≥ 0), S_tmin, S_tmax (the σ window that gets churn), S_noise (the
    noise's scale, slightly above 1 to offset the denoiser's loss of detail); the rest as
    :class:`ContinuousSampler`."""

    def __init__(
        self,
        *args,
        S_churn: float = 0.0,  # noqa: N803 (the paper's names)
        S_tmin: float = 0.0,  # noqa: N803
        S_tmax: float = math.inf,  # noqa: N803
        S_noise: float = 1.0,  # noqa: N803
        **kwargs,
    ) -> None:
        if S_churn < 0 or S_noise <= 0 or S_tmin < 0 or S_tmax < S_tmin:
            raise ValueError(
                f"sampler.S_churn={S_churn}, S_tmin={S_tmin}, S_tmax={S_tmax}, S_noise={S_noise}: expected "
                "S_churn >= 0, S_noise > 0 and 0 <= S_tmin <= S_tmax"
            )
        self.S_churn, self.S_tmin, self.S_tmax, self.S_noise = float(S_churn), float(S_tmin), float(S_tmax), S_noise
        kwargs.setdefault("clip_denoised", False)  # EDM does not clip x̂_0
        super().__init__(*args, **kwargs)

    def evaluation_plan(self, num_steps: int) -> list[int]:
        """As Heun: level 0, then each later level twice (the corrector into it, then its churned predictor)."""
        return [0] + [i for i in range(1, num_steps) for _ in (0, 1)]

    def set_timesteps(self, num_steps: int | None = None) -> None:
        super().set_timesteps(num_steps)
        n = self.num_steps_run
        cap = math.inf if self.on_sigma_process else self.diffusion.continuous.sigma_max  # a discrete model's end
        gamma_max = min(self.S_churn / n, math.sqrt(2.0) - 1.0)
        sigmas = self.sigmas[:-1].tolist()
        self.gammas = [gamma_max if self.S_tmin <= s <= self.S_tmax else 0.0 for s in sigmas]
        self.sigma_hats = [min(s * (1.0 + g), max(cap, s)) for s, g in zip(sigmas, self.gammas, strict=True)]
        self.hat_levels = [self.level(s) for s in self.sigma_hats]
        hat_t = self.network_timesteps(torch.tensor(self.sigma_hats, dtype=torch.float64))
        # predictor evaluations (the first of each level, at σ̂) take σ̂'s timestep; correctors keep σ_{i+1}'s
        self.predictor = [k % 2 == 0 for k in range(len(self.plan))]
        for k, i in enumerate(self.plan):
            if self.predictor[k]:
                self.timesteps[k] = float(hat_t[i])
        self._t_host = self.timesteps.tolist()
        self.init_noise_sigma = self.sigma_hats[0] if self.on_sigma_process else 1.0

    def step(self, model_output, t, x_t, generator=None) -> SamplerOutput:
        k = self.advance(t)
        i = self.plan[k]
        level = self.hat_levels[i] if self.predictor[k] else self.levels[i]
        x0, eps, _ = self.predict_at(model_output, x_t, level)
        if self.predictor[k]:
            prev = self.predict_step(i, x0, eps)
        else:
            prev = self.correct_step(i, x0, eps, generator)
        return SamplerOutput(prev_sample=prev.to(x_t.dtype), pred_x0=x0)

    def predict_step(self, i: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Euler from σ̂_i to σ_{i+1}: x̃' = x̃̂ + (σ_{i+1} − σ̂_i) d_i = x̂_0 + σ_{i+1} d_i (d_i = ε̂ at σ̂_i)."""
        to = self.levels[i + 1]
        x_pred = x0 + to.sigma * eps
        if to.sigma > 0:
            self.state["pending"] = (x_pred, eps, self.sigma_hats[i])
        return x_pred * to.alpha

    def correct_step(self, i: int, x0: torch.Tensor, eps: torch.Tensor, generator) -> torch.Tensor:
        """The trapezoidal corrector into level i (x̃' + (σ_i − σ̂_{i−1})(d' − d)/2), then level i's churn."""
        x_pred, d_start, sigma_hat = self.state.pop("pending")
        x_next = x_pred + (self.levels[i].sigma - sigma_hat) * (eps - d_start) / 2
        raise_to = self.sigma_hats[i]
        if raise_to > self.levels[i].sigma:  # Alg. 2 lines 5–6 for the next predictor
            spread = math.sqrt(raise_to**2 - self.levels[i].sigma ** 2) * self.S_noise
            x_next = x_next + spread * self.noise(x_next, generator)
        return x_next * self.hat_levels[i].alpha

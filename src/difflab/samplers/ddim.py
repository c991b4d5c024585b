"""DDIM (Song et al. 2021; survey Method 5.8, Remark 5.9): a non-Markovian reverse process that reuses any
ε/x0/v model trained for DDPM, on a sub-sequence τ_1 < … < τ_S of the T steps.

x_{τ_{i−1}} = sqrt(ᾱ_{τ_{i−1}}) x̂_0 + sqrt(1 − ᾱ_{τ_{i−1}} − σ_{τ_i}²) ε̂ + σ_{τ_i} z              (eq. 12)
σ_{τ_i}(η) = η sqrt((1 − ᾱ_{τ_{i−1}})/(1 − ᾱ_{τ_i})) sqrt(1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}})              (eq. 16)
η = 0 is deterministic (the probability-flow ODE discretised); η = 1 at S = T is DDPM with σ² = β̃.
``sigma="hat"`` is the σ̂ row of the paper's Table 1, which is not eq. 12: σ̂_{τ_i}² = 1 − ᾱ_{τ_i}/ᾱ_{τ_{i−1}} is
larger than 1 − ᾱ_{τ_{i−1}} at most steps, so the paper's σ̂ process is DDPM with the larger variance on the
respaced chain (the authors' code, ``ddpm_steps``):
x_{τ_{i−1}} = μ̃_{τ_i}(x_{τ_i}, x̂_0) + σ̂_{τ_i} z,  μ̃ the posterior mean of the jump τ_i → τ_{i−1} (Ho et al. eq. 7),
i.e. :class:`AncestralSampler` with ``fixed_large`` on the same τ (same numbers from the same x_t, ε̂ and z).
Indices are 0-based: τ = T−1 is the paper's t = T; before τ_1 comes ᾱ = 1 and no noise is added.
``variance_type=analytic`` keeps eq. 12's mean with λ = σ_{τ_i}(η) and adds noise of Analytic-DPM's σ*² (Bao et al.
2022, eq. 7 with λ² = η² β̃: "Analytic-DDIM", noisy even at η = 0; :mod:`difflab.samplers.analytic`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from difflab.samplers.analytic import AnalyticVariance
from difflab.samplers.base import Sampler, SamplerOutput
from difflab.schedules import posterior_terms
from difflab.utils.enums import StrEnumChoice, parse_enum


class DDIMSigma(StrEnumChoice):
    ETA = "eta"  # σ(η), eq. 16
    HAT = "hat"  # σ̂ = sqrt(1 − ᾱ_t/ᾱ_prev) around the posterior mean (DDPM with σ² = β on τ), η unused


class DDIMSampler(AnalyticVariance, Sampler):
    """DDIM with ``eta`` (η ≥ 0) and ``sigma`` (``eta`` | ``hat``); ``gamma`` and ``analytic_clip_pixels`` for
    ``variance_type=analytic`` as :class:`AncestralSampler` (clip default 1, the paper's Analytic-DDIM); the other
    arguments as :class:`Sampler`."""

    markov = False  # Analytic-DDIM: λ² = η² β̃

    def __init__(
        self,
        *args,
        eta: float = 0.0,
        sigma: str | DDIMSigma = DDIMSigma.ETA,
        gamma: str | Path | torch.Tensor | None = None,
        analytic_clip_pixels: float | None = None,
        **kwargs,
    ) -> None:
        if eta < 0:
            raise ValueError(f"sampler.eta={eta}: expected >= 0")
        self.eta = float(eta)
        self.sigma_type = parse_enum(DDIMSigma, sigma, "sampler.sigma")
        self._init_analytic(gamma, analytic_clip_pixels)
        super().__init__(*args, **kwargs)

    @property
    def deterministic(self) -> bool:
        """Whether every step is the η = 0 map (no noise drawn): what inversion, interpolation and encode-decode
        need, and what makes repeated draws from one start identical."""
        return self.eta == 0 and self.sigma_type is DDIMSigma.ETA and not self.analytic

    def _on_set_timesteps(self, ascending: torch.Tensor) -> None:
        ab = self.diffusion.alphas_cumprod_64[ascending]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        jump = 1.0 - ab / ab_prev
        if self.sigma_type is DDIMSigma.HAT:
            if self.analytic:
                raise ValueError(
                    "sampler.variance_type=analytic with sampler.sigma=hat: σ̂ fixes the variance; Analytic-DDIM "
                    "takes sigma=eta (any η), Analytic-DDPM sampler=ddpm"
                )
            sigma = jump.sqrt()
            # x_prev = coef_x0 x̂_0 + coef_xt x_t + σ̂ z: the posterior mean of the jump (see the module docstring)
            post = posterior_terms(ab, ab_prev)
            coef_x0, coef_xt, coef_eps = post["coef_x0"], post["coef_xt"], torch.zeros_like(ab)
        else:
            sigma = self.eta * ((1.0 - ab_prev) / (1.0 - ab)).sqrt() * jump.sqrt()
            # eq. 12: x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 − ᾱ_prev − σ²) ε̂ + σ z (σ ≤ sqrt(1 − ᾱ_prev) for η ≤ 1)
            coef_x0, coef_xt = ab_prev.sqrt(), torch.zeros_like(ab)
            coef_eps = (1.0 - ab_prev - sigma**2).clamp(min=0.0).sqrt()
            if self.analytic:  # eq. 12's mean with λ = σ(η), Analytic-DPM's noise σ*(λ)
                sigma = self.analytic_sigma2(ascending, ab, ab_prev, sigma**2).sqrt()
        sigma[0] = 0.0  # the last step adds no noise
        self._table = {
            "sqrt_ab": ab.sqrt().float(),
            "sqrt_ab_prev": ab_prev.sqrt().float(),
            "sqrt_one_minus_ab": (1.0 - ab).sqrt().float(),
            "coef_x0": coef_x0.float(),
            "coef_xt": coef_xt.float(),
            "dir_coef": coef_eps.float(),
            "sigma": sigma.float(),
        }
        self._posterior_mean = self.sigma_type is DDIMSigma.HAT
        self._noisy = (sigma > 0).tolist()  # decided once on the host: no tensor-to-bool in the step loop

    def step(
        self,
        model_output: torch.Tensor,
        t: int | torch.Tensor,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        i = self.step_index(t)
        x0, eps, _ = self.predict(model_output, t, x_t)
        if self._posterior_mean:  # σ̂: μ̃(x_t, x̂_0)
            prev = self._table["coef_x0"][i] * x0 + self._table["coef_xt"][i] * x_t.float()
        else:  # eq. 12 without noise
            prev = self._table["coef_x0"][i] * x0 + self._table["dir_coef"][i] * eps
        if self._noisy[i]:
            z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=prev.dtype)
            prev = prev + self._table["sigma"][i] * z
        return SamplerOutput(prev_sample=prev.to(x_t.dtype), pred_x0=x0)

    @torch.no_grad()
    def encode(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x_start: torch.Tensor,
        num_steps: int | None = None,
        num_levels: int | None = None,
    ) -> torch.Tensor:
        """Deterministic inversion x_0 → x_{τ_S}: the η = 0 update run forwards (Song et al. §4.3, eq. 13); with
        ``num_levels`` = n only up to τ_n (img2img's start).

        From level τ_{i−1} to τ_i: ε̂ = ε_θ(x_{τ_{i−1}}, τ_i) (the usual first-order approximation of the ODE),
        x̂_0 = (x_{τ_{i−1}} − sqrt(1 − ᾱ_{τ_{i−1}}) ε̂)/sqrt(ᾱ_{τ_{i−1}}),
        x_{τ_i} = sqrt(ᾱ_{τ_i}) x̂_0 + sqrt(1 − ᾱ_{τ_i}) ε̂.
        The model output is read as ε through :meth:`Sampler.predict` (any parameterisation), without clipping.
        """
        self.set_timesteps(num_steps)
        x = x_start.float()
        for i, t in enumerate(self.timesteps.flip(0).tolist()[:num_levels]):
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            _, eps, _ = self.predict(model_fn(x, t_batch), t, x, clip=False)
            sqrt_ab_prev = self._table["sqrt_ab_prev"][i]
            x0 = (x - (1.0 - sqrt_ab_prev**2).sqrt() * eps) / sqrt_ab_prev
            x = self._table["sqrt_ab"][i] * x0 + self._table["sqrt_one_minus_ab"][i] * eps
        return x

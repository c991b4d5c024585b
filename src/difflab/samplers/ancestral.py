"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2; survey Method 3.21), respaced when K < T.

x_{s} = μ̃(x_t, x̂_0) + σ z,  z ~ N(0, I), no noise at the last step, where s is the previous kept timestep.
For s = t − 1 this is Algorithm 2. For K < T the jump t → s uses β_{t|s} = 1 − ᾱ_t/ᾱ_s, which is how
Nichol & Dhariwal (§4) respace a model so that learned variances stay valid.
With ``variance_type=analytic`` σ² is Analytic-DPM's σ*² of each jump (Bao et al. 2022, eq. 7 with λ² = β̃_{t|s},
"Analytic-DDPM"; :mod:`difflab.samplers.analytic`), the mean unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.samplers.analytic import AnalyticVariance
from difflab.samplers.base import Sampler, SamplerOutput
from difflab.schedules import model_log_variance, posterior_terms


class AncestralSampler(AnalyticVariance, Sampler):
    """Algorithm 2 with σ_t² = β̃_t (``fixed_small``), β_t (``fixed_large``), the learned range or Analytic-DPM's
    σ*² (``analytic``).

    ``variance_type`` overrides the model's choice for fixed-variance models (DDPM found both equally good).
    ``gamma``: Γ for ``analytic`` (a file written by ``src/analytic.py``, or a (T,) tensor; null: sample.py and
    eval.py take the one beside the checkpoint); ``analytic_clip_pixels``: the bound on the noise of the step into
    x_{τ_1} in 2/255 levels (null: the paper's, 2 on the linear schedule, 1 otherwise; ``inf``: none).
    """

    def __init__(
        self,
        *args,
        gamma: str | Path | torch.Tensor | None = None,
        analytic_clip_pixels: float | None = None,
        **kwargs,
    ) -> None:
        self._init_analytic(gamma, analytic_clip_pixels)
        super().__init__(*args, **kwargs)

    def _on_set_timesteps(self, ascending: torch.Tensor) -> None:
        ab = self.diffusion.alphas_cumprod_64[ascending]
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        terms = posterior_terms(ab, ab_prev)
        log_betas = torch.log(terms["betas"])
        # fixed_large: σ² = β_{t|s}; at the first step β̃ of the next one, as GaussianDiffusion.log_betas_clipped.
        log_large = torch.cat([terms["log_variance_clipped"][1:2], log_betas[1:]]) if ab.numel() > 1 else log_betas
        self._table = {
            "coef_x0": terms["coef_x0"].float(),
            "coef_xt": terms["coef_xt"].float(),
            "log_variance_small": terms["log_variance_clipped"].float(),
            "log_variance_large": log_large.float(),
            "log_betas": log_betas.float(),  # learned_range's upper end, unclipped (see model_log_variance)
        }
        if self.analytic:  # eq. 7 with λ² = β̃_{t|s}; entry 0 (no noise) is log 0
            sigma2 = self.analytic_sigma2(ascending, ab, ab_prev, terms["variance"])
            self._table["log_variance_analytic"] = torch.log(sigma2).float()

    def log_variance(self, index: int, var_output: torch.Tensor | None) -> torch.Tensor:
        """log σ² at step ``index`` (the respaced β̃ and β, see :func:`model_log_variance`; Analytic-DPM's σ*²)."""
        if self.analytic:
            return self._table["log_variance_analytic"][index]
        return model_log_variance(
            self.variance_type,
            self._table["log_variance_small"][index],
            self._table["log_variance_large"][index],
            self._table["log_betas"][index],
            var_output,
        )

    def step(
        self,
        model_output: torch.Tensor,
        t: int | torch.Tensor,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        i = self.step_index(t)
        x0, _, var_output = self.predict(model_output, t, x_t)
        mean = self._table["coef_x0"][i] * x0 + self._table["coef_xt"][i] * x_t.float()
        if i == 0:  # Algorithm 2, line 4: z = 0 at the last step
            return SamplerOutput(prev_sample=mean.to(x_t.dtype), pred_x0=x0)
        log_var = self.log_variance(i, var_output)
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
        prev = mean + torch.exp(0.5 * log_var) * noise
        return SamplerOutput(prev_sample=prev.to(x_t.dtype), pred_x0=x0)

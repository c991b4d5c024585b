"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2; survey Method 3.21), respaced when K < T.

x_{s} = μ̃(x_t, x̂_0) + σ z,  z ~ N(0, I), no noise at the last step, where s is the previous kept timestep.
For s = t − 1 this is Algorithm 2. For K < T the jump t → s uses β_{t|s} = 1 − ᾱ_t/ᾱ_s, which is how
Nichol & Dhariwal (§4) respace a model so that learned variances stay valid.
"""

from __future__ import annotations

import torch

from difflab.samplers.base import Sampler, SamplerOutput
from difflab.schedules import model_log_variance, posterior_terms


class AncestralSampler(Sampler):
    """Algorithm 2 with σ_t² = β̃_t (``fixed_small``), β_t (``fixed_large``) or the learned range.

    ``variance_type`` overrides the model's choice for fixed-variance models (DDPM found both equally good).
    """

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

    def log_variance(self, index: int, var_output: torch.Tensor | None) -> torch.Tensor:
        """log σ² at step ``index`` (the respaced β̃ and β, see :func:`model_log_variance`)."""
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

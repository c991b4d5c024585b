"""SDE-DPM-Solver++ multistep (Lu et al. 2022b, §5 / Appendix; diffusers' ``algorithm_type="sde-dpmsolver++"``,
k-diffusion's ``sample_dpmpp_2m_sde``): the same x̂_0 polynomial as :mod:`difflab.samplers.dpmpp`, integrated
along the reverse SDE instead of the ODE, so each step injects fresh noise (h = λ_{i+1} − λ_i):
    order 1:  x_{i+1} = (s'/s) e^{−h} x_i + α' (1 − e^{−2h}) m_0 + s' sqrt(1 − e^{−2h}) z   (= DDIM, η = 1)
    order 2:  … + ½ α' (1 − e^{−2h}) D_1                                                    (2M SDE, midpoint)
    order 3:  … + α' ((1 − e^{−2h})/(−2h) + 1) D_1 + α' ((1 − e^{−2h} − 2h)/(2h)² − ½) D_2
Stochastic; one network evaluation per step; no noise at the last step (σ = 0 gives x̂_0).
"""

from __future__ import annotations

import math

import torch

from difflab.samplers.dpmpp import DPMSolverMultistepSampler


class DPMSolverSDESampler(DPMSolverMultistepSampler):
    """``sampler=dpmpp_2m_sde``; arguments as :class:`DPMSolverMultistepSampler`."""

    def update(
        self, x: torch.Tensor, terms: tuple[torch.Tensor, ...], i: int, generator: torch.Generator | None
    ) -> torch.Tensor:
        s, to = self.levels[i], self.levels[i + 1]
        h = to.lambda_ - s.lambda_
        one_minus = -math.expm1(-2.0 * h)  # 1 − e^{−2h}
        out = (to.std / s.std * math.exp(-h)) * x + (to.alpha * one_minus) * terms[0]
        if len(terms) == 2:
            out = out + (0.5 * to.alpha * one_minus) * terms[1]
        elif len(terms) == 3:
            out = out + (to.alpha * (one_minus / (-2.0 * h) + 1.0)) * terms[1]
            out = out + (to.alpha * ((one_minus - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * terms[2]
        return out + (to.std * math.sqrt(one_minus)) * self.noise(x, generator)

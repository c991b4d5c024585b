"""Samplers of the score view: annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) and the predictor–corrector
sampler (Song et al. 2021, Algorithms 2–3; the code of score_sde).

Both work in x̃ = x_t/α_t, where every process is the VE SDE in σ (:mod:`difflab.schedules.sigma_paths`), with the
score of any model from Tweedie's formula, s(x̃, σ) = ∇_x̃ log p(x̃; σ) = −ε̂/σ = (x̂_0 − x̃)/σ²:
  Langevin step at σ with step ε        x̃ ← x̃ + (ε/2) s + sqrt(ε) z                       (Song & Ermon eq. 4)
  annealed (Alg. 1)                     ε_i = ε σ_i²/σ_L², n steps per level, then D(x̃; σ_L) (``denoise``)
  reverse-diffusion predictor           x̃ ← x̃ + (σ_i² − σ_{i+1}²) s + sqrt(σ_i² − σ_{i+1}²) z   (Song et al. eq. 47)
  Euler–Maruyama predictor (t = ln σ)   x̃ ← x̃ + 2σ_i² Δ s + sqrt(2σ_i² Δ) z,  Δ = ln σ_i − ln σ_{i+1}
  Langevin corrector (snr rule)         ε = 2 (r ‖z‖/‖s‖)²,  x̃ ← x̃ + ε s + sqrt(2ε) z    (Alg. 4; batch-mean norms)
On the last predictor step (σ_{N} = 0) the mean is x̂_0 (Tweedie), which is returned with ``denoise`` (score_sde's
``x_mean``), else the mean plus its noise. The Langevin corrector's step is the VE one (score_sde's α = 1): in x̃ the
snr rule makes it scale-free, so VP models use it unchanged (score_sde's VP corrector has an extra factor 1 − β_i).
"""

from __future__ import annotations

import math

import torch

from difflab.samplers.base import SamplerOutput
from difflab.samplers.continuous import ContinuousSampler
from difflab.utils.enums import StrEnumChoice, parse_enum


class Predictor(StrEnumChoice):
    REVERSE_DIFFUSION = "reverse_diffusion"
    EULER_MARUYAMA = "euler_maruyama"
    NONE = "none"  # corrector only


class ScoreSampler(ContinuousSampler):
    """What the score-view samplers share: the score at an evaluation and the x the next evaluation sees."""

    def __init__(self, *args, denoise: bool = True, **kwargs) -> None:
        self.denoise = bool(denoise)
        kwargs.setdefault("clip_denoised", False)
        super().__init__(*args, **kwargs)

    def step(self, model_output, t, x_t, generator=None) -> SamplerOutput:
        k = self.advance(t)
        i = self.plan[k]
        level = self.levels[i]
        x0, eps, _ = self.predict_at(model_output, x_t, level)
        x = x_t.float() * level.recip_alpha  # x̃
        score = -eps / level.sigma
        x_next = self.update(k, i, x, x0, score, generator)
        following = self.plan[k + 1] if k + 1 < len(self.plan) else None
        alpha = 1.0 if following is None else self.levels[following].alpha  # the model space of what comes next
        return SamplerOutput(prev_sample=(x_next * alpha).to(x_t.dtype), pred_x0=x0)

    def update(self, k: int, i: int, x, x0, score, generator) -> torch.Tensor:
        raise NotImplementedError


class AnnealedLangevinSampler(ScoreSampler):
    """``sampler=langevin``: annealed Langevin dynamics over the ``steps`` σ levels (default: geometric from σ_max to
    σ_min, NCSN's), ``n_steps_each`` steps per level with ε_i = ``step_size`` σ_i²/σ_L²; ``denoise`` adds the final
    step x̂_0 = D(x̃; σ_L) (Jolicoeur-Martineau et al. 2021; NCSNv2). NFE = steps · n_steps_each (+ 1)."""

    def __init__(self, *args, n_steps_each: int = 5, step_size: float = 6.2e-6, **kwargs) -> None:
        if n_steps_each < 1 or step_size <= 0:
            raise ValueError(
                f"sampler.n_steps_each={n_steps_each}, step_size={step_size}: expected >= 1 and > 0 "
                "(Song & Ermon 2019: 100 and 2e-5; NCSNv2 CIFAR-10: 5 and 6.2e-6)"
            )
        self.n_steps_each, self.step_size = int(n_steps_each), float(step_size)
        super().__init__(*args, **kwargs)

    def evaluation_plan(self, num_steps: int) -> list[int]:
        plan = [i for i in range(num_steps) for _ in range(self.n_steps_each)]
        return plan + [num_steps - 1] if self.denoise else plan

    def update(self, k, i, x, x0, score, generator):
        if self.denoise and k == len(self.plan) - 1:
            return x0
        eps = self.step_size * (self.levels[i].sigma / self.levels[len(self.levels) - 2].sigma) ** 2
        return x + 0.5 * eps * score + math.sqrt(eps) * self.noise(x, generator)


class PredictorCorrectorSampler(ScoreSampler):
    """``sampler=pc``: at each of the ``steps`` levels, ``corrector_steps`` Langevin corrector steps (snr rule,
    ``snr``), then the ``predictor`` to the next level (``reverse_diffusion`` | ``euler_maruyama`` | ``none``:
    corrector only). NFE = steps · (corrector_steps + 1) (predictor none: steps · corrector_steps). Song et al.'s
    CIFAR-10 settings: VE reverse diffusion + 1 Langevin step at snr 0.16, 1000 levels; VP snr 0.01."""

    def __init__(
        self,
        *args,
        predictor: str | Predictor = Predictor.REVERSE_DIFFUSION,
        corrector_steps: int = 1,
        snr: float = 0.16,
        **kwargs,
    ) -> None:
        self.predictor = parse_enum(Predictor, predictor, "sampler.predictor")
        if corrector_steps < 0 or snr <= 0:
            raise ValueError(f"sampler.corrector_steps={corrector_steps}, snr={snr}: expected >= 0 and > 0")
        if corrector_steps == 0 and self.predictor is Predictor.NONE:
            raise ValueError("sampler.predictor=none with sampler.corrector_steps=0 leaves nothing to do")
        self.corrector_steps, self.snr = int(corrector_steps), float(snr)
        super().__init__(*args, **kwargs)

    def evaluation_plan(self, num_steps: int) -> list[int]:
        per_level = self.corrector_steps + (0 if self.predictor is Predictor.NONE else 1)
        return [i for i in range(num_steps) for _ in range(per_level)]

    def is_predictor(self, k: int) -> bool:
        per_level = self.corrector_steps + 1
        return self.predictor is not Predictor.NONE and k % per_level == self.corrector_steps

    def update(self, k, i, x, x0, score, generator):
        last = k == len(self.plan) - 1
        if self.is_predictor(k):
            return self.predict(i, x, x0, score, generator, last)
        mean, noisy = self.correct(x, score, generator)
        return mean if last and self.denoise else noisy

    def correct(self, x, score, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One Langevin corrector step (score_sde's ``LangevinCorrector``, α = 1): (x_mean, x)."""
        z = self.noise(x, generator)
        grad_norm = score.flatten(1).norm(dim=1).mean()
        noise_norm = z.flatten(1).norm(dim=1).mean()
        eps = 2.0 * (self.snr * noise_norm / grad_norm) ** 2
        mean = x + eps * score
        return mean, mean + (2.0 * eps).sqrt() * z

    def predict(self, i, x, x0, score, generator, last: bool) -> torch.Tensor:
        """The predictor from level i to i + 1 (the mean alone on the last step with ``denoise``)."""
        sigma, to = self.levels[i].sigma, self.levels[i + 1].sigma
        if self.predictor is Predictor.EULER_MARUYAMA and to > 0:
            variance = 2.0 * sigma**2 * (math.log(sigma) - math.log(to))
        else:  # reverse diffusion; also the last Euler–Maruyama step, whose Δ ln σ is infinite
            variance = sigma**2 - to**2
        mean = x0 if to == 0 else x + variance * score
        if last and self.denoise:
            return mean
        return mean + math.sqrt(variance) * self.noise(x, generator)

"""Pseudo numerical methods (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"):
PLMS (``sampler=plms``, latent-diffusion's default sampler) and PNDM (``sampler=pndm``, its Runge–Kutta warm start).

Each step has a transfer part φ and a gradient part. φ moves x_t to t' along the DDIM (η = 0) map with a given ε
(eq. 11, equal to DDIM's eq. 12 written with x̂_0):
    φ(x_t, ε, t → t') = sqrt(ᾱ_{t'}) x̂_0 + sqrt(1 − ᾱ_{t'}) ε,   x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε)/sqrt(ᾱ_t)
The gradient part chooses ε from the network's ε̂ at earlier points — linear multistep (eq. 12, PLMS):
    ε' = (55 e_t − 59 e_{t+δ} + 37 e_{t+2δ} − 9 e_{t+3δ})/24
with fewer terms while there is less history: PLMS starts with a pseudo improved Euler step (the average of ε̂ at
both ends of the first step: 2 evaluations), then Adams–Bashforth of order 2 and 3 (diffusers' ``skip_prk_steps``);
PNDM starts with three pseudo Runge–Kutta steps (eq. 13: ε̂ at t, twice at the midpoint, at t − δ; weights 1/6, 1/3,
1/3, 1/6), four evaluations each. NFE: steps + 1 (PLMS), steps + 9 (PNDM). The ε's are combined, so any
parameterisation works (diffusers combines the raw v of a v-model instead: the same for ε-models only).
Indices are 0-based; after the last level (t = τ_1) comes ᾱ = 1, as in :class:`DDIMSampler`.
"""

from __future__ import annotations

import torch

from difflab.samplers.base import Sampler, SamplerOutput
from difflab.samplers.thresholding import dynamic_threshold

# Adams–Bashforth coefficients on ε̂ (newest first) by the length of the history
_MULTISTEP = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
# pseudo Runge–Kutta: the weight of each of the four evaluations in the combined ε
_RK_WEIGHTS = (1 / 6, 1 / 3, 1 / 3, 1 / 6)


class PNDMSampler(Sampler):
    """PLMS / PNDM on the model's timesteps. ``prk_steps``: true = PNDM (three pseudo Runge–Kutta steps first, needs
    ``steps`` >= 4), false = PLMS (a pseudo improved-Euler first step). Other arguments as :class:`Sampler`."""

    def __init__(self, *args, prk_steps: bool = False, **kwargs) -> None:
        self.prk_steps = bool(prk_steps)
        super().__init__(*args, **kwargs)

    def num_evaluations(self, num_steps: int | None = None) -> int:
        steps = self.num_steps if num_steps is None else num_steps
        return steps + 9 if self.prk_steps else steps + (steps > 1)

    def set_timesteps(self, num_steps: int | None = None) -> None:
        super().set_timesteps(num_steps)  # the levels τ, then the plan of evaluations over them
        self.timesteps = torch.tensor([t for t, *_ in self._plan], dtype=torch.long)

    def _on_set_timesteps(self, ascending: torch.Tensor) -> None:
        taus = ascending.flip(0).tolist() + [-1]  # descending levels, then "before τ_1" (ᾱ = 1)
        if self.prk_steps and len(taus) < 5:
            raise ValueError(f"sampler.steps={len(taus) - 1}: PNDM's Runge–Kutta warm start needs steps >= 4")
        # one (t of the evaluation, t of the transfer's start, t of its end, role) per network evaluation
        plan: list[tuple[int, int, int, str]] = []
        if self.prk_steps:
            for hi, lo in zip(taus[:3], taus[1:4], strict=True):
                mid = lo + (hi - lo) // 2
                plan += [(hi, hi, mid, "rk0"), (mid, hi, mid, "rk1"), (mid, hi, lo, "rk2"), (lo, hi, lo, "rk3")]
            first = 3
        else:
            plan.append((taus[0], taus[0], taus[1], "start"))
            if taus[1] >= 0:
                plan.append((taus[1], taus[0], taus[1], "euler_mean"))
            first = 1
        plan += [(taus[i], taus[i], taus[i + 1], "multistep") for i in range(first, len(taus) - 1)]
        self._plan = plan
        ab = self.diffusion.alphas_cumprod_64
        self._sqrt_ab = {t: float(ab[t].sqrt()) if t >= 0 else 1.0 for t in set(taus) | {p[0] for p in plan}}
        self._reset()

    def _reset(self) -> None:
        self._counter, self._history, self._start, self._rk_sum = 0, [], None, None

    def transfer(self, x: torch.Tensor, eps: torch.Tensor, t_from: int, t_to: int) -> tuple[torch.Tensor, ...]:
        """φ(x, ε, t_from → t_to) (eq. 11) and the x̂_0 it passes through, thresholded as DDIM's
        (``clip_denoised`` / ``dynamic_threshold``, ε recomputed from the thresholded x̂_0). The combined ε of a
        multistep or averaged step is not the network's at x, so its x̂_0 = (x − sqrt(1 − ᾱ) ε)/sqrt(ᾱ) carries the
        combination's error times 1/sqrt(ᾱ): 4·10⁴ at the cosine schedule's t = T, where an unclipped PLMS diverges."""
        a, a_to = self._sqrt_ab[t_from], self._sqrt_ab[t_to]
        x0 = (x - (1.0 - a * a) ** 0.5 * eps) / a
        if self.clip_denoised:
            thresholded = dynamic_threshold(x0, self.dynamic_threshold) if self.dynamic_threshold else x0.clamp(-1, 1)
            if a < 1.0:
                eps = (x - a * thresholded) / (1.0 - a * a) ** 0.5
            x0 = thresholded
        return a_to * x0 + (1.0 - a_to * a_to) ** 0.5 * eps, x0

    def step(
        self,
        model_output: torch.Tensor,
        t: int | torch.Tensor,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        if self._counter >= len(self._plan):
            self._reset()  # a new chain without set_timesteps
        t_eval, t_from, t_to, role = self._plan[self._counter]
        if int(t) != t_eval:
            raise ValueError(f"timestep {int(t)}: PNDM expected {t_eval} (evaluation {self._counter} of its plan)")
        _, eps, _ = self.predict(model_output, t_eval, x_t)
        start = x_t.float()
        if role in ("start", "rk0"):
            self._start = start
            self._history.append(eps)
        if role.startswith("rk"):  # the Runge–Kutta combination, from the step's start
            weight = _RK_WEIGHTS[int(role[2])]
            self._rk_sum = weight * eps if role == "rk0" else self._rk_sum + weight * eps
            start, eps = self._start, self._rk_sum if role == "rk3" else eps
        elif role == "euler_mean":  # pseudo improved Euler: the mean of ε̂ at both ends, from the first step's start
            start, eps = self._start, (eps + self._history[-1]) / 2
        elif role == "multistep":
            self._history = [*self._history[-3:], eps]
            coefficients = _MULTISTEP[len(self._history)]
            eps = sum(c * e for c, e in zip(coefficients, reversed(self._history), strict=False))
        prev, x0 = self.transfer(start, eps, t_from, t_to)
        self._counter += 1
        return SamplerOutput(prev_sample=prev.to(x_t.dtype), pred_x0=x0)

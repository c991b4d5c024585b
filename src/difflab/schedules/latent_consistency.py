"""The discrete-time math of latent consistency models (Luo et al. 2023, "LCM"; diffusers' ``LCMScheduler``).

LCM's consistency function lives on the model's own timesteps t ∈ {0, …, T − 1} and its x_t (LCM eq. 9, with the
scalings of CM App. C evaluated at s·t instead of σ):
    f(x_t, t) = c_skip(t) x_t + c_out(t) x̂_0(x_t, t),
    c_skip(t) = σ_d²/((s t)² + σ_d²),   c_out(t) = s t/sqrt((s t)² + σ_d²)             (s = timestep_scaling)
so f(x_0, 0) = x_0 exactly; from t = 1 on c_out ≈ 1 (s = 10, σ_d = 0.5: c_skip(1) = 0.0025), i.e. f is essentially
the network's x̂_0. In the σ view of :mod:`difflab.schedules.consistency` (x̃ = x_t/α_t) the same f reads
c_skip(t) α_t x̃ + c_out(t) D(x̃, σ_t): that is how :class:`LatentConsistencyModule` evaluates it, reusing the σ
machinery (the network still sees x_t = α_t x̃ and its integer t).

The teacher's solver (LCM §4.3, "skipping-step"): DDIM over the grid of ``original_steps`` = T/k points
    t_i = i k − 1, i = 1 … T/k,    each solved from t_i to t_{i−1} (t_0 := 0)                        (LCM eq. 8)
One DDIM step (η = 0) is exactly an Euler step of the probability-flow ODE in σ: x̃_{t'} = x̂_0 + σ_{t'} ε̂ =
x̃ + (σ_{t'} − σ_t)(x̃ − x̂_0)/σ_t (:func:`ddim_step`).

Sampling (LCM Alg. 3; ``LCMScheduler.set_timesteps``): n timesteps taken from the same grid, reversed, at the indices
⌊i · (T/k)/n⌋, i = 0 … n − 1 (:func:`lcm_timesteps`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from difflab.schedules.consistency import expand

# D(x̃, σ, t): the (guided) denoiser at x̃ (B, C, H, W), σ (B,), the network's timestep t (B,)
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LCMBoundary:
    """c_skip(t), c_out(t) of LCM (module docstring). ``timestep_scaling``: s (10 in diffusers' ``LCMScheduler`` and
    its training script); ``sigma_data``: σ_d (0.5)."""

    def __init__(self, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> None:
        if not timestep_scaling > 0:
            raise ValueError(f"timestep_scaling={timestep_scaling}: expected > 0 (diffusers' LCMScheduler: 10)")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data={sigma_data}: expected > 0")
        self.timestep_scaling, self.sigma_data = float(timestep_scaling), float(sigma_data)

    def scalings(self, t: torch.Tensor | float) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """(c_skip, c_out) at timesteps t (a tensor of any shape, in float64 or its own float dtype; or a number,
        giving Python floats)."""
        if isinstance(t, torch.Tensor):
            scaled = t.to(torch.promote_types(t.dtype, torch.float32)) * self.timestep_scaling
            denominator = scaled**2 + self.sigma_data**2
            return self.sigma_data**2 / denominator, scaled / denominator.sqrt()
        scaled = float(t) * self.timestep_scaling
        denominator = scaled**2 + self.sigma_data**2
        return self.sigma_data**2 / denominator, scaled / math.sqrt(denominator)

    def __call__(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f = c_skip(t) x_t + c_out(t) x̂_0 for x_t, x̂_0 (B, C, H, W) and t (B,)."""
        c_skip, c_out = self.scalings(t.to(torch.float64))
        return expand(c_skip, x0) * x_t + expand(c_out, x0) * x0


def skipping_grid(num_timesteps: int, skip: int) -> torch.Tensor:
    """LCM's solver grid with t_0 = 0 prepended: [0, k − 1, 2k − 1, …, (T/k) k − 1] ((T/k + 1,) long, ascending).
    Consecutive pairs (t_{i−1}, t_i) are the DDIM jumps of distillation; the first, k − 1 → 0, is LCM's
    ``start − k`` clamped at 0."""
    if not 1 <= skip <= num_timesteps // 2:
        raise ValueError(
            f"model.skip={skip}: expected 1 <= k <= T/2 = {num_timesteps // 2} (the teacher's T = {num_timesteps}; "
            "LCM: k = 20 of T = 1000)"
        )
    points = torch.arange(1, num_timesteps // skip + 1, dtype=torch.long) * skip - 1
    return torch.cat([torch.zeros(1, dtype=torch.long), points])


def lcm_timesteps(num_timesteps: int, original_steps: int, num_steps: int) -> list[int]:
    """The n = ``num_steps`` sampling timesteps (descending) of ``LCMScheduler.set_timesteps``: the grid
    t_i = i ⌊T/original_steps⌋ − 1 reversed, at the indices ⌊i · original_steps/n⌋ (numpy's ``linspace(0,
    original_steps, n, endpoint=False)`` floored: the same float64 products)."""
    if not 1 <= original_steps <= num_timesteps:
        raise ValueError(f"sampler.original_steps={original_steps}: expected 1 <= original_steps <= T={num_timesteps}")
    if not 1 <= num_steps <= original_steps:
        raise ValueError(
            f"sampler.steps={num_steps}: expected 1 <= steps <= sampler.original_steps={original_steps} (the "
            "distillation grid the steps are taken from)"
        )
    k = num_timesteps // original_steps
    grid = [(i + 1) * k - 1 for i in range(original_steps)][::-1]
    stride = original_steps / num_steps
    return [grid[math.floor(i * stride)] for i in range(num_steps)]


def ddim_step(denoiser: Denoiser, x: torch.Tensor, start: tuple, end: tuple) -> torch.Tensor:
    """One DDIM step (η = 0) from ``start`` = (σ (B,), t (B,)) to ``end`` in the σ view: x̃' = x̂_0 + σ' ε̂ with
    ε̂ = (x̃ − x̂_0)/σ, an Euler step of dx̃/dσ = (x̃ − D)/σ (LCM's solver Ψ; the signature of
    :func:`difflab.schedules.consistency.heun_step`)."""
    (s_from, t_from), (s_to, _) = start, end
    x0 = denoiser(x, s_from, t_from)
    return x0 + expand(s_to, x) * (x - x0) / expand(s_from, x)

"""The σ-space math of consistency models (Song et al. 2023, "CM"; Song & Dhariwal 2023, "iCT").

Everything lives in the variance-exploding view x̃ = x_0 + σ ε of any of our processes: a discrete Gaussian
diffusion is seen at x̃ = x_t/α_t, σ = sqrt((1 − ᾱ_t)/ᾱ_t) (its network gets x_t = x̃/sqrt(1 + σ²) and the
fractional t(σ) of :meth:`ContinuousSchedule.sigma_to_t`); a :class:`SigmaProcess` (EDM, VE, …) is that view.

The consistency function (CM App. C, with ε = σ_min):
    f(x̃, σ) = c_skip(σ) x̃ + c_out(σ) F(x̃, σ),
    c_skip = σ_d²/((σ − σ_min)² + σ_d²),   c_out = σ_d (σ − σ_min)/sqrt(σ² + σ_d²)        so f(x̃, σ_min) = x̃.
F is the *EDM output* of the network's denoiser D(x̃, σ) (its x̂_0, whatever the network predicts):
    F = (D − c_skip^EDM x̃)/c_out^EDM,  c_skip^EDM = σ_d²/(σ² + σ_d²), c_out^EDM = σ σ_d/sqrt(σ² + σ_d²)
(Karras et al. eq. 7). Since c_out = ((σ − σ_min)/σ) c_out^EDM exactly, this is computed without the division as
    f = c_skip x̃ + ((σ − σ_min)/σ) (D − c_skip^EDM x̃)                                  (:meth:`__call__`).
Why: for an EDM-preconditioned network (``model=edm``) F *is* the raw network, so f is the paper's parameterisation
to the letter (CM initialises CD students that way, f ≈ D of the teacher away from σ_min). For a DDPM ε-network
(the study's teacher) the same formula gives f ≈ the teacher's x̂_0 = x̃ − σ ε̂ at initialisation: the natural
choice of LCM (F = x̂_0), but with the paper's c_skip/c_out. Using F = x̂_0 in the paper's formula directly would
give f → σ_d x̂_0 = x̂_0/2 at large σ (c_out → σ_d; LCM avoids that only by dropping σ_d from its c_out). One code
path for ε, x0, v and EDM-family networks: the module's D.

Training grids (CM §5, iCT §3): N Karras points σ_1 = σ_min < … < σ_N = σ_max,
    σ_i = (σ_min^{1/ρ} + (i − 1)/(N − 1) (σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ,
iCT's discretisation curriculum N(k) = min(s_0 2^⌊k/K'⌋, s_1) + 1, K' = ⌊K/(log₂⌊s_1/s_0⌋ + 1)⌋ (iCT eq. 7), and
its discrete log-normal p(σ_i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std)) (§3.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from difflab.schedules.continuous import NoiseLevel, x0_eps_from_output
from difflab.schedules.parameterization import Parameterization

# D(x̃, σ, t): the denoiser at x̃ (B, C, H, W), σ (B,) and the network's timestep t (B,) of each σ
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, …, 1) in ``like``'s dtype and device."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def sigma_level(process, sigma: torch.Tensor) -> NoiseLevel:
    """The :class:`NoiseLevel` (tensors shaped like σ) at which the process's network sees x̃ = x_0 + σ ε:
    α = 1 for a σ process, α = 1/sqrt(1 + σ²) for a discrete (variance-preserving) one."""
    if getattr(process, "process_kind", "gaussian") == "sigma":
        one = torch.ones_like(sigma)
        return NoiseLevel(alpha=one, std=sigma, recip_alpha=one, sigma=sigma)
    recip_alpha = (1.0 + sigma * sigma).sqrt()
    return NoiseLevel(alpha=1.0 / recip_alpha, std=sigma / recip_alpha, recip_alpha=recip_alpha, sigma=sigma)


def denoised(
    process,
    parameterization: Parameterization,
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """D(x̃, σ) = x̂_0 (B, C, H, W) of ``model_fn(x_in, t)`` (a raw network output in ``parameterization``) at
    x̃ (B, C, H, W), σ (B,), t (B,): the network sees x_in = α x̃ (:func:`sigma_level`). In x̃'s dtype, ≥ float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    level = sigma_level(process, expand(sigma, x))
    x_in = level.alpha * x
    out = model_fn(x_in, t)
    return x0_eps_from_output(parameterization, out.to(dtype), x_in, level)[0]


def heun_step(denoiser: Denoiser, x: torch.Tensor, start: tuple, end: tuple) -> torch.Tensor:
    """One Heun step of the probability-flow ODE dx̃/dσ = (x̃ − D(x̃, σ))/σ (Karras et al. Alg. 1, lines 4–8) from
    ``start`` = (σ (B,), t (B,)) to ``end`` = (σ (B,), t (B,)), both σ > 0: CD's teacher solver Φ (CM eq. 6)."""
    (s_from, t_from), (s_to, t_to) = start, end
    a, b = expand(s_from, x), expand(s_to, x)
    d = (x - denoiser(x, s_from, t_from)) / a
    x_euler = x + (b - a) * d
    d_end = (x_euler - denoiser(x_euler, s_to, t_to)) / b
    return x + (b - a) * (d + d_end) / 2


class ConsistencyFunction:
    """f(x̃, σ) from the denoiser D (see the module docstring), and the σ grids of training.

    Args:
        sigma_min: σ_min = ε of the boundary condition f(x̃, σ_min) = x̃ (CM: 0.002); the smallest σ of every grid.
        sigma_max: the largest σ (CM: 80); sampling starts from x̃ = σ_max z.
        sigma_data: σ_d of the scalings (0.5 for images in [−1, 1]).
        rho: ρ of the Karras grids (7).
    """

    def __init__(self, sigma_min: float, sigma_max: float, sigma_data: float = 0.5, rho: float = 7.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: expected 0 < sigma_min < sigma_max")
        if not sigma_data > 0 or not rho > 0:
            raise ValueError(f"sigma_data={sigma_data}, rho={rho}: expected > 0")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data, self.rho = float(sigma_data), float(rho)

    @classmethod
    def for_process(cls, process, sigma_data: float = 0.5, rho: float = 7.0) -> ConsistencyFunction:
        """The default for a model of ``process``: its smallest σ (t = 0) up to min(80, its largest σ)."""
        view = process.continuous
        return cls(view.sigma_min, min(80.0, view.sigma_max), sigma_data, rho)

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) of CM App. C at σ (any shape)."""
        sd, shifted = self.sigma_data, sigma - self.sigma_min
        return sd**2 / (shifted**2 + sd**2), sd * shifted / (sigma**2 + sd**2).sqrt()

    def __call__(self, x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """f = c_skip x̃ + ((σ − σ_min)/σ)(D − c_skip^EDM x̃) for x̃ and D = ``x0`` (B, C, H, W), σ (B,) or a float."""
        sigma = expand(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1), x0)
        sd2 = self.sigma_data**2
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        ratio = (sigma - self.sigma_min) / sigma  # c_out / c_out^EDM
        return c_skip * x + ratio * (x0 - sd2 / (sigma**2 + sd2) * x)

    def grid(self, num_scales: int) -> torch.Tensor:
        """The N Karras points σ_1 = σ_min < … < σ_N = σ_max (ascending, (N,) float64), N ≥ 2."""
        if num_scales < 2:
            raise ValueError(f"num_scales={num_scales}: a consistency grid needs at least 2 points")
        ramp = torch.linspace(0, 1, num_scales, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (lo + ramp * (hi - lo)) ** self.rho

    def sampling_sigmas(self, num_steps: int) -> torch.Tensor:
        """The σ of an N-step multistep sampler (descending, (N,) float64), the automatic choice: the first N points
        of a Karras grid of N + 1 from σ_max down to σ_min (its last point, σ_min, would add no noise: a step that
        changes nothing). 1 step: [σ_max]; 2 steps (ρ = 7, 0.002–80): [80, 2.52]."""
        return self.grid(num_steps + 1).flip(0)[:num_steps]


def curriculum_scales(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's N(k) = min(s_0 2^⌊k/K'⌋, s_1) + 1 with K' = ⌊K/(log₂⌊s_1/s_0⌋ + 1)⌋ (iCT eq. 7; K = ``total_steps``)."""
    if not 1 <= s0 <= s1 or total_steps < 1:
        raise ValueError(f"s0={s0}, s1={s1}, total_steps={total_steps}: expected 1 <= s0 <= s1 and total_steps >= 1")
    stage = max(1, total_steps // (int(math.log2(s1 // s0)) + 1))
    return min(s0 * 2 ** (max(step, 0) // stage), s1) + 1


def lognormal_index_probabilities(sigmas: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """iCT §3.5: p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std)) for the N − 1
    pairs (σ_i, σ_{i+1}) of an ascending grid (N,); (N − 1,) float64 summing to 1."""
    cdf = torch.erf((sigmas.to(torch.float64).log() - p_mean) / (math.sqrt(2.0) * p_std))
    mass = (cdf[1:] - cdf[:-1]).clamp(min=0)
    total = mass.sum()
    if not total > 0:  # every pair far in one tail (float64 erf saturates): uniform
        return torch.full_like(mass, 1.0 / mass.numel())
    return mass / total

"""The Gaussian diffusion process q (Ho et al. 2020; survey "An overview of diffusion models", §3).

Forward process, eq. (4) of Ho et al.:  q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I),  ᾱ_t = Π_{s≤t} (1 − β_s).
Posterior, eqs. (6)–(7) (survey Lemma 3.15):  q(x_{t−1} | x_t, x_0) = N(μ̃_t(x_t, x_0), β̃_t I).

Timesteps are 0-based here: index ``t`` in [0, T) is the paper's t + 1, as in improved-diffusion.
All coefficients are computed in float64 and stored as float32 buffers (persistent=False), so they follow the
module to its device (DDP included) without being written into checkpoints.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.schedules.betas import BetaSchedule, make_betas
from difflab.schedules.continuous import ContinuousSchedule, NoiseLevel, eps_from_x0, x0_eps_from_output
from difflab.schedules.parameterization import Parameterization, VarianceType
from difflab.utils.enums import parse_enum


def posterior_terms(alphas_cumprod: torch.Tensor, alphas_cumprod_prev: torch.Tensor) -> dict[str, torch.Tensor]:
    """Coefficients of q(x_s | x_t, x_0) for a jump s < t, elementwise over any shape.

    With β_{t|s} = 1 − ᾱ_t/ᾱ_s (β_t itself when s = t − 1):
      β̃      = β_{t|s} (1 − ᾱ_s) / (1 − ᾱ_t)                                    (Ho et al. eq. 7)
      μ̃      = sqrt(ᾱ_s) β_{t|s}/(1 − ᾱ_t) · x_0 + sqrt(1 − β_{t|s}) (1 − ᾱ_s)/(1 − ᾱ_t) · x_t
    ``log_variance_clipped`` replaces log β̃ = log 0 at the first step (ᾱ_s = 1) by the next value, as in
    improved-diffusion. Respacing (Nichol & Dhariwal §4) uses the same formulas on a sub-sequence of ᾱ.
    """
    betas = 1.0 - alphas_cumprod / alphas_cumprod_prev
    variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    clipped = variance.clone()
    if clipped.numel() > 1:
        clipped[..., 0] = variance[..., 1]
    else:
        clipped[..., 0] = betas[..., 0]
    return {
        "betas": betas,
        "variance": variance,
        "log_variance_clipped": torch.log(clipped),
        "coef_x0": alphas_cumprod_prev.sqrt() * betas / (1.0 - alphas_cumprod),
        "coef_xt": (1.0 - betas).sqrt() * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
    }


def model_log_variance(
    variance_type: VarianceType,
    log_variance_small: torch.Tensor,
    log_variance_large: torch.Tensor,
    log_betas: torch.Tensor,
    var_output: torch.Tensor | None,
) -> torch.Tensor:
    """log Σ_θ of the reverse step, computed in fp32:
    FIXED_SMALL: ``log_variance_small`` = log β̃ (clipped at the first step);
    FIXED_LARGE: ``log_variance_large`` = log β with β̃_1 in place of β at the first step (a better decoder L_0);
    LEARNED_RANGE: v log β + (1 − v) log β̃ with v = (output + 1)/2 (Nichol & Dhariwal eq. 15), where the upper
    end is ``log_betas``, the *unclipped* log β (improved-diffusion's ``max_log = log(betas)``): at t = 0 it is
    log β_0, not the fixed_large array's log β̃_1 (with that, both ends are log β̃_1 at t = 0 and the variance
    output is ignored there: a wrong decoder L_0 and no gradient for it).
    """
    if variance_type is VarianceType.FIXED_SMALL:
        return log_variance_small
    if variance_type is VarianceType.FIXED_LARGE:
        return log_variance_large
    if var_output is None:
        raise ValueError("variance_type=learned_range needs a network with 2C output channels")
    frac = (var_output.float() + 1.0) / 2.0
    return frac * log_betas + (1.0 - frac) * log_variance_small


class GaussianDiffusion(nn.Module):
    """The forward process and every conversion between parameterisations.

    Args:
        beta_schedule: ``linear`` | ``scaled_linear`` | ``cosine`` (see :mod:`difflab.schedules.betas`).
        num_timesteps: T.
        beta_start, beta_end: β_1 and β_T of the (scaled) linear schedules.
        cosine_s, max_beta: offset s and β clip of the cosine schedule.
    """

    def __init__(
        self,
        beta_schedule: str | BetaSchedule = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
    ) -> None:
        super().__init__()
        self.beta_schedule = parse_enum(BetaSchedule, beta_schedule, "schedule.beta_schedule")
        betas = make_betas(self.beta_schedule, num_timesteps, beta_start, beta_end, cosine_s, max_beta)
        self.num_timesteps = num_timesteps
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        post = posterior_terms(alphas_cumprod, alphas_cumprod_prev)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": post["variance"],
            "posterior_log_variance_clipped": post["log_variance_clipped"],
            "posterior_mean_coef1": post["coef_x0"],
            "posterior_mean_coef2": post["coef_xt"],
            # σ² = β for FIXED_LARGE; at t = 0 β̃_1 instead, for a better decoder L_0 (as improved-diffusion)
            "log_betas_clipped": torch.log(torch.cat([post["variance"][1:2], betas[1:]]))
            if num_timesteps > 1
            else torch.log(betas),
            # the upper end of LEARNED_RANGE: log β_t at every t, t = 0 included (see model_log_variance)
            "log_betas": torch.log(betas),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.float(), persistent=False)
        # A float64 CPU copy for samplers that derive coefficients of sub-sequences (respacing, DDIM): ratios of
        # ᾱ close to 1 lose digits in float32. A plain attribute: it stays on the CPU, where tables are built.
        self.alphas_cumprod_64 = alphas_cumprod
        # σ_t, λ_t and the σ ↔ t map of the continuous-time solvers (float64, CPU; see schedules/continuous.py)
        self.continuous = ContinuousSchedule(alphas_cumprod)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def extract(buffer: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gather ``buffer[t]`` (t: (B,) long) and reshape to (B, 1, ..., 1) to broadcast against x: (B, ...)."""
        return buffer[t].reshape(t.shape[0], *([1] * (x.ndim - 1)))

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean sqrt(ᾱ_t) x_0 and variance (1 − ᾱ_t) of q(x_t | x_0); x_start: (B, C, H, W)."""
        mean = self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        return mean, self.extract(1.0 - self.alphas_cumprod, t, x_start).expand_as(x_start)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε  (Ho et al. eq. 4 reparameterised); all (B, C, H, W)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """μ̃_t(x_t, x_0), β̃_t and log β̃_t (clipped) of q(x_{t−1} | x_t, x_0) (Ho et al. eqs. 6–7)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self.extract(self.posterior_variance, t, x_t)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parameterisations
    def noise_level(self, t: torch.Tensor, x: torch.Tensor) -> NoiseLevel:
        """The coefficients α, s, 1/α, σ of timesteps t (B,), shaped (B, 1, ..., 1) to broadcast against x.

        Long t reads the tables; float t (the solvers' timesteps between the model's) takes σ_t by log-σ
        interpolation (:meth:`ContinuousSchedule.t_to_sigma`, exact at integer t, float64 on the CPU)."""
        if t.is_floating_point():
            sigma = self.continuous.t_to_sigma(t.detach().cpu()).reshape(t.shape[0], *([1] * (x.ndim - 1)))
            recip_alpha = (1.0 + sigma**2).sqrt()
            values = {"alpha": 1.0 / recip_alpha, "std": sigma / recip_alpha, "recip_alpha": recip_alpha}
            return NoiseLevel(**{k: v.to(x.device, torch.float32) for k, v in {**values, "sigma": sigma}.items()})
        return NoiseLevel(
            alpha=self.extract(self.sqrt_alphas_cumprod, t, x),
            std=self.extract(self.sqrt_one_minus_alphas_cumprod, t, x),
            recip_alpha=self.extract(self.sqrt_recip_alphas_cumprod, t, x),
            sigma=self.extract(self.sqrt_recipm1_alphas_cumprod, t, x),
        )

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)  (Ho et al. eq. 15)."""
        return x0_eps_from_output(Parameterization.EPS, eps, x_t, self.noise_level(t, x_t))[0]

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε̂ = (x_t / sqrt(ᾱ_t) − x̂_0) / sqrt(1/ᾱ_t − 1)."""
        return eps_from_x0(x_t, x0, self.noise_level(t, x_t))

    def velocity(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0  (Salimans & Ho 2022, §4)."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_start) * noise
            - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start
        )

    def training_target(
        self, parameterization: Parameterization, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The regression target of the network for the given parameterisation."""
        if parameterization is Parameterization.EPS:
            return noise
        if parameterization is Parameterization.X0:
            return x_start
        return self.velocity(x_start, noise, t)

    def predict_x0_eps(
        self,
        parameterization: Parameterization,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a network output (B, C, H, W) in ``parameterization`` at timesteps t (B,) to (x̂_0, ε̂) (see
        :func:`difflab.schedules.continuous.x0_eps_from_output`, the one place these conversions live).

        With ``clip_denoised`` x̂_0 is clamped to [-1, 1] and ε̂ recomputed from the clamped x̂_0 so both stay
        consistent (what the DDIM update needs).
        """
        return x0_eps_from_output(parameterization, model_output, x_t, self.noise_level(t, x_t), clip_denoised)

    @staticmethod
    def split_output(
        model_output: torch.Tensor, variance_type: VarianceType
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a learned-variance output (B, 2C, H, W) into the mean part and the variance part v ∈ [-1, 1]."""
        if not variance_type.learned:
            return model_output, None
        mean_part, var_part = model_output.chunk(2, dim=1)
        return mean_part, var_part

    def p_mean_variance(
        self,
        parameterization: Parameterization,
        variance_type: VarianceType,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """p_θ(x_{t−1} | x_t) = N(μ_θ, Σ_θ): the posterior mean at x̂_0 and the model's variance (fp32).

        model_output: (B, C or 2C, H, W). Returns ``mean``, ``log_variance``, ``pred_x0``, ``pred_eps``.
        """
        mean_output, var_output = self.split_output(model_output, variance_type)
        x0, eps = self.predict_x0_eps(parameterization, mean_output.float(), x_t.float(), t, clip_denoised)
        mean, _, _ = self.q_posterior_mean_variance(x0, x_t.float(), t)
        log_variance = model_log_variance(
            variance_type,
            self.extract(self.posterior_log_variance_clipped, t, x_t),
            self.extract(self.log_betas_clipped, t, x_t),
            self.extract(self.log_betas, t, x_t),
            var_output,
        )
        return {"mean": mean, "log_variance": log_variance.expand_as(mean), "pred_x0": x0, "pred_eps": eps}

    def extra_repr(self) -> str:
        return f"beta_schedule={self.beta_schedule.value}, num_timesteps={self.num_timesteps}"

"""The σ-parameterised process and its preconditionings: EDM (Karras et al. 2022) and the score SDEs in its terms.

The process is x̃ = x_0 + σ ε over a continuous σ ∈ [σ_min, σ_max] (the variance-exploding view, ``process_kind =
"sigma"``). A network F becomes the denoiser (Karras et al. eq. 7)
    D(x̃; σ) = c_skip(σ) x̃ + c_out(σ) F(c_in(σ) x̃; c_noise(σ)),
trained on  E_σ E_{x_0,ε} λ(σ) ||D(x_0 + σ ε; σ) − x_0||²  (eq. 8) with σ drawn per preconditioning. Table 1:

  precond.  c_skip           c_out                c_in             c_noise       training σ                    λ(σ)
  edm       σ_d²/(σ² + σ_d²)  σ σ_d/sqrt(σ²+σ_d²)  1/sqrt(σ²+σ_d²)  ¼ ln σ        ln σ ~ N(P_mean, P_std²)      1/c_out²
  vp/subvp  1                 −σ                   1/sqrt(σ² + 1)   (M − 1) t(σ)  σ(t), t ~ U(ε_t, 1)           1/σ²
  ve        1                 σ                    1                ln(σ/2)       log-uniform in [σ_min, σ_max]  1/σ²
  iddpm     1                 −σ                   1/sqrt(σ² + 1)   M − 1 − j(σ)  u_j, j ~ U{0 … M−1}           1/σ²
(edm's 1/c_out² = (σ² + σ_d²)/(σ σ_d)²).
In every row λ(σ) = 1/c_out(σ)², so the loss equals ||F − (x_0 − c_skip x̃)/c_out||²: unit weight on the network's own
output (k-diffusion's ``Denoiser.loss``), computed that way here (no 1/σ² blow-up in low precision). ``vp`` is a
DDPM ε-prediction network seen at x_t = x̃/sqrt(1 + σ²); ``ve`` is NCSN's σ-scaled score network (F = −σ ∇log p).
Sampling steps of ``sigma_schedule=model`` follow the table's "time steps" row (:meth:`SigmaProcess.sampling_sigmas`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from difflab.schedules import sigma_paths as paths
from difflab.schedules.continuous import NoiseLevel
from difflab.schedules.parameterization import Parameterization, VarianceType
from difflab.utils.enums import StrEnumChoice, parse_enum


class Preconditioning(StrEnumChoice):
    """The rows of Karras et al.'s Table 1 (``subvp``: the VP row on Song et al.'s sub-VP path)."""

    EDM = "edm"
    VP = "vp"
    SUBVP = "subvp"
    VE = "ve"
    IDDPM = "iddpm"


# σ range of each row when model.schedule.sigma_min/sigma_max are null (EDM's code; VE: its training range)
DEFAULT_RANGE = {Preconditioning.EDM: (0.002, 80.0), Preconditioning.VE: (0.02, 100.0)}


@dataclass(frozen=True)
class Scalings:
    """c_skip, c_out, c_in, c_noise at σ, each shaped like the σ they were computed from."""

    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


@dataclass(frozen=True)
class SigmaView:
    """What the continuous-time solvers read of a σ process: its σ range; the network's timestep is σ itself."""

    sigma_min: float
    sigma_max: float
    num_timesteps: int

    @staticmethod
    def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma, dtype=torch.float64)


class SigmaProcess(nn.Module):
    """x̃ = x_0 + σ ε with a preconditioned denoiser; the drop-in for :class:`GaussianDiffusion` in ``model.schedule``
    (``schedule=edm``, ``schedule=ve``). Timesteps everywhere (training, samplers, ``model(x, t)``) are σ.

    Args:
        preconditioning: ``edm`` | ``vp`` | ``subvp`` | ``ve`` | ``iddpm`` (the table above).
        sigma_data: σ_d, the data's standard deviation (EDM: 0.5 for images in [−1, 1]).
        sigma_min, sigma_max: the σ range (null: edm 0.002–80, ve 0.02–100, vp/subvp σ(ε_s)–σ(1), iddpm u_{M−1}–u_0).
            ``ve`` trains on it; every row samples in it.
        P_mean, P_std: the log-normal training σ of ``edm`` (−1.2, 1.2).
        beta_min, beta_d: the VP/sub-VP path β(t) = β_min + β_d t (0.1, 19.9: Song et al.'s β_max = 20).
        epsilon_t, epsilon_s: the smallest training / sampling t of vp and subvp (1e-5, 1e-3).
        M, C1, C2: the timestep scale of vp/subvp's c_noise and iddpm's M steps and cosine constants (1000, 0.001,
            0.008).
    """

    process_kind = "sigma"

    def __init__(
        self,
        preconditioning: str | Preconditioning = Preconditioning.EDM,
        sigma_data: float = 0.5,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        P_mean: float = -1.2,  # noqa: N803 (the paper's name)
        P_std: float = 1.2,  # noqa: N803
        beta_min: float = 0.1,
        beta_d: float = 19.9,
        epsilon_t: float = 1e-5,
        epsilon_s: float = 1e-3,
        M: int = 1000,  # noqa: N803
        C1: float = 0.001,  # noqa: N803
        C2: float = 0.008,  # noqa: N803
    ) -> None:
        super().__init__()
        self.preconditioning = parse_enum(Preconditioning, preconditioning, "model.schedule.preconditioning")
        for key, value in {"sigma_data": sigma_data, "P_std": P_std, "beta_d": beta_d, "M": M}.items():
            if not value > 0:
                raise ValueError(f"model.schedule.{key}={value}: expected > 0")
        if not 0 < epsilon_t < 1 or not 0 < epsilon_s < 1:
            raise ValueError(f"model.schedule.epsilon_t={epsilon_t}, epsilon_s={epsilon_s}: expected in (0, 1)")
        self.sigma_data, self.P_mean, self.P_std = float(sigma_data), float(P_mean), float(P_std)
        self.beta_min, self.beta_d = float(beta_min), float(beta_d)
        self.epsilon_t, self.epsilon_s, self.M = float(epsilon_t), float(epsilon_s), int(M)
        self.num_timesteps = self.M  # the limit of sampler.steps, as for the discrete processes
        self.u_64 = paths.iddpm_sigmas(self.M, C1, C2)  # iddpm's levels u_0 … u_M (float64, CPU)
        self.register_buffer("u", self.u_64.float(), persistent=False)
        lo, hi = self.default_range()
        self.sigma_min = lo if sigma_min is None else float(sigma_min)
        self.sigma_max = hi if sigma_max is None else float(sigma_max)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(
                f"model.schedule.sigma_min={self.sigma_min}, sigma_max={self.sigma_max}: expected 0 < sigma_min < "
                "sigma_max (null: the preconditioning's own range)"
            )
        self.continuous = SigmaView(self.sigma_min, self.sigma_max, self.num_timesteps)

    def default_range(self) -> tuple[float, float]:
        """(σ_min, σ_max) of the preconditioning when the config leaves them null."""
        p = self.preconditioning
        if p in DEFAULT_RANGE:
            return DEFAULT_RANGE[p]
        if p is Preconditioning.IDDPM:
            return float(self.u_64[self.M - 1]), float(self.u_64[0])
        ends = torch.tensor([self.epsilon_s, 1.0], dtype=torch.float64)
        lo, hi = self.path_sigma(ends).tolist()
        return lo, hi

    # ------------------------------------------------------------------ the σ(t) path of vp / subvp
    def path_sigma(self, t: torch.Tensor) -> torch.Tensor:
        fn = paths.subvp_sigma if self.preconditioning is Preconditioning.SUBVP else paths.vp_sigma
        return fn(t, self.beta_min, self.beta_d)

    def path_time(self, sigma: torch.Tensor) -> torch.Tensor:
        fn = paths.subvp_time if self.preconditioning is Preconditioning.SUBVP else paths.vp_time
        return fn(sigma, self.beta_min, self.beta_d)

    # ------------------------------------------------------------------ preconditioning (Table 1)
    def scalings(self, sigma: torch.Tensor) -> Scalings:
        """c_skip, c_out, c_in, c_noise at σ (any shape, float32 or float64)."""
        p, sd = self.preconditioning, self.sigma_data
        if p is Preconditioning.EDM:
            root = (sigma**2 + sd**2).sqrt()
            return Scalings(sd**2 / root**2, sigma * sd / root, 1.0 / root, sigma.log() / 4.0)
        one = torch.ones_like(sigma)
        if p is Preconditioning.VE:
            return Scalings(one, sigma, one, (0.5 * sigma).log())
        c_in = (sigma**2 + 1.0).rsqrt()
        if p is Preconditioning.IDDPM:
            c_noise = (self.M - 1 - self.round_sigma_index(sigma)).to(sigma.dtype)
        else:
            c_noise = (self.M - 1) * self.path_time(sigma)
        return Scalings(one, -sigma, c_in, c_noise)

    def round_sigma_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """j of the nearest u_j (iddpm's c_noise; EDM's ``round_sigma``), long, same shape as σ."""
        u = self.u.to(sigma.device, sigma.dtype)
        return (sigma.reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)

    def precondition(self, net_fn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x̃; σ) = c_skip x̃ + c_out F(c_in x̃; c_noise): x (B, C, H, W), σ (B,); ``net_fn(x_in, c_noise)`` is F."""
        c = self.scalings(self.expand(sigma, x))
        out = net_fn(c.c_in * x, c.c_noise.flatten())
        return c.c_skip * x + c.c_out * out.to(x.dtype)

    def training_target(self, x_start: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """F's regression target (x_0 − c_skip x̃)/c_out, so that ||F − target||² = λ(σ) ||D − x_0||²."""
        c = self.scalings(self.expand(sigma, x_noisy))
        return (x_start - c.c_skip * x_noisy) / c.c_out

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) = 1/c_out(σ)² (Table 1: (σ² + σ_d²)/(σ σ_d)² for edm, 1/σ² for the others)."""
        return self.scalings(sigma).c_out ** -2

    @staticmethod
    def expand(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ (B,) → (B, 1, …, 1) in ``like``'s dtype."""
        return sigma.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    # ------------------------------------------------------------------ training σ and the forward process
    def sample_sigma(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training σ (B,) float32 from the preconditioning's distribution (Table 1)."""
        p = self.preconditioning
        if p is Preconditioning.EDM:
            normal = torch.randn(batch_size, device=device, generator=generator)
            return (self.P_mean + self.P_std * normal).exp()
        if p is Preconditioning.IDDPM:
            j = torch.randint(0, self.M, (batch_size,), device=device, generator=generator)
            return self.u.to(device)[j]
        uniform = torch.rand(batch_size, device=device, generator=generator)
        if p is Preconditioning.VE:
            return paths.ve_sigma(uniform, self.sigma_min, self.sigma_max)
        t = 1.0 + uniform * (self.epsilon_t - 1.0)
        return self.path_sigma(t.double()).float()

    def q_sample(self, x_start: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x̃ = x_0 + σ ε for x_start, noise (B, C, H, W) and σ (B,)."""
        return x_start + self.expand(sigma, x_start) * noise

    # ------------------------------------------------------------------ what the samplers read
    def level(self, sigma: float) -> NoiseLevel:
        """The solvers' coefficients at σ: x̃ = x_0 + σ ε (α = 1, s = σ)."""
        return NoiseLevel(alpha=1.0, std=sigma, recip_alpha=1.0, sigma=sigma)

    def sampling_sigmas(self, num_steps: int, rho: float = 7.0) -> torch.Tensor:
        """The N sampling σ of Table 1's "time steps" row (descending, (N,) float64; σ_N = 0 is not included):
        edm Karras ρ; vp/subvp σ(t_i), t_i = 1 + i/(N−1) (ε_s − 1); ve geometric σ_max → σ_min;
        iddpm u_⌊j_0 + (M − 1 − j_0) i/(N−1) + ½⌋ with j_0 = 8."""
        p, n = self.preconditioning, num_steps
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)  # [0] for N = 1: σ_max
        if p is Preconditioning.EDM:
            return paths.karras_sigmas(n, self.sigma_min, self.sigma_max, rho)
        if p is Preconditioning.VE:
            return self.sigma_max * (self.sigma_min / self.sigma_max) ** ramp
        if p is Preconditioning.IDDPM:
            j0 = 8
            index = (j0 + (self.M - 1 - j0) * ramp + 0.5).floor().long()
            return self.u_64[index]
        return self.path_sigma(1.0 + ramp * (self.epsilon_s - 1.0))

    def split_output(self, model_output: torch.Tensor, variance_type: VarianceType) -> tuple[torch.Tensor, None]:
        """(the denoiser output D, None): no variance channels."""
        return model_output, None

    def check_model(self, parameterization: Parameterization, variance_type: VarianceType, loss: nn.Module) -> None:
        """The module's output is the denoiser D = x̂_0; what F predicts is set by the preconditioning."""
        if parameterization is not Parameterization.X0:
            raise ValueError(
                f"model.parameterization={parameterization.value}: an EDM-family model outputs the denoiser "
                "D(x; σ) = x̂_0 (parameterization=x0); what the network itself predicts follows "
                "model.schedule.preconditioning (vp/ve/iddpm: ε-like, edm: the mixed target)"
            )
        if variance_type.learned:
            raise ValueError("model.variance_type=learned_range: the σ processes have no reverse variance to learn")

    def extra_repr(self) -> str:
        return (
            f"preconditioning={self.preconditioning.value}, sigma_data={self.sigma_data}, "
            f"sigma=[{self.sigma_min:.4g}, {self.sigma_max:.4g}]"
        )


def ncsn_sigma_max(images: torch.Tensor, chunk: int = 1024) -> float:
    """Song & Ermon 2020, Technique 1: σ_max = the largest Euclidean distance between two training images (N, ...),
    so that the noisiest level can move any image to any other. Exact, in float64, O(N²) in chunks."""
    flat = images.reshape(images.shape[0], -1).double()
    best = 0.0
    for start in range(0, flat.shape[0], chunk):
        best = max(best, float(torch.cdist(flat[start : start + chunk], flat).max()))
    return best if best > 0 else math.nan

"""Analytic-DPM (Bao, Li, Zhu & Zhang, ICLR 2022): the optimal reverse variance in closed form from one moment of
the trained noise predictor, used by the ancestral (DDPM) and DDIM samplers with ``sampler.variance_type=analytic``.

Notation of the paper (indices of the sampled sub-sequence τ: n is τ_k, n − 1 is τ_{k−1}):
  α_n = ᾱ_n/ᾱ_{n−1} (the jump's α),  β̄_n = 1 − ᾱ_n,
  Γ_n = E_{q_n(x_n)} ||ε̂(x_n, n)||² / d                                                  (eq. 9, estimated by MC)
  σ*_n² = λ_n² + (sqrt(β̄_n/α_n) − sqrt(β̄_{n−1} − λ_n²))² (1 − Γ_n)                     (eq. 7 / Theorem 1 with
          β̄_n E||∇log q_n||²/d = Γ_n, since ∇log q_n = −ε̂/sqrt(β̄_n); the factor is (1 − Γ_n), not (1 − β̄_n Γ_n))
λ_n² is the variance of the chosen forward family q_λ(x_{n−1}|x_n, x_0): β̃_n = β̄_{n−1}/β̄_n (1 − α_n) for DDPM
(the Markov chain, "Analytic-DDPM"), η² β̃_n for DDIM (λ = 0 at η = 0, "Analytic-DDIM").

Written as the authors' code does (``reverse_ddpm_ms_eps`` / ``reverse_ddim_ms_eps`` in baofff/Analytic-DPM,
cifar_imagenet_codes/core/inference/sampler/): σ² = λ² + c_n · v_n with
  v_n = β̄_n/ᾱ_n (1 − Γ_n)  the expected per-dimension Cov[x_0 | x_n] ("cov_x_0_pred"),
  c_n = (sqrt(ᾱ_{n−1}) − sqrt((β̄_{n−1} − λ²) ᾱ_n/β̄_n))²  ("coeff_cov_x_0"; c_n v_n is the eq. 7 term).
Theorem 2 (data in [a, b]^d): λ_n² ≤ σ*_n² ≤ λ_n² + c_n ((b − a)/2)², i.e. 0 ≤ v_n ≤ ((b − a)/2)² = 1 for images
in [−1, 1]: the estimate is clipped there (the code's ``np.clip(cov_x_0_pred, 0., 1.)``).
Last steps (the code's ``clip_sigma_idx=1``, ``clip_pixel``): the final step τ_1 → x_0 adds no noise, and the step
into x_{τ_1} has σ² ≤ (clip_pixel · 2/255 · sqrt(π/2))², i.e. E|σ z| = σ sqrt(2/π) ≤ clip_pixel quantisation
levels of 2/255. The code uses clip_pixel = 2 for Analytic-DDPM on the linear schedule, 1 on the cosine schedule
and 1 for Analytic-DDIM (run_cifar10.py, phases sample_analytic_ddpm / sample_analytic_ddim).

Γ is written once per checkpoint by ``python src/analytic.py ckpt=PATH`` (:mod:`difflab.tasks.analytic`) as
``<ckpt stem>.analytic.safetensors`` beside it; this module reads it (safetensors: data, never code).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from difflab.schedules import BetaSchedule, VarianceType
from difflab.utils.hashing import state_dict_sha256

GAMMA_FORMAT = "difflab.analytic_dpm.gamma"
GAMMA_VERSION = 1
GAMMA_SUFFIX = ".analytic.safetensors"
X0_HALF_RANGE = 1.0  # (b − a)/2 of Theorem 2 for images in [−1, 1]
COMMAND = "python src/analytic.py ckpt=CKPT"


def gamma_path(ckpt: str | Path) -> Path:
    """Where ``python src/analytic.py ckpt=CKPT`` writes Γ: ``<ckpt stem>.analytic.safetensors`` beside it."""
    ckpt = Path(ckpt)
    return ckpt.with_name(ckpt.stem + GAMMA_SUFFIX)


@dataclass(frozen=True)
class GammaFile:
    """Γ_n for every n of the model's T steps, (T,) float64, and its record (``weights_sha256``, ``ckpt``, ...)."""

    gamma: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    path: str | None = None


def read_gamma(path: str | Path, key: str = "sampler.gamma") -> GammaFile:
    """The Γ file at ``path`` (safetensors: tensors and a JSON record only), checked: format, (T,) float64, finite."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"sampler.variance_type=analytic needs Γ_n, the mean squared noise prediction of this model, and {key}="
            f"{str(path)!r} does not exist: write it with `{COMMAND}` (it writes <ckpt stem>{GAMMA_SUFFIX} beside "
            f"the checkpoint, where sample.py and eval.py look), or set {key}=PATH"
        )
    try:
        with safe_open(str(path), framework="pt") as file:
            meta = file.metadata() or {}
            gamma = file.get_tensor("gamma") if "gamma" in file.keys() else None
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{key}={str(path)!r}: not a readable safetensors file ({err})") from err
    if meta.get("format") != GAMMA_FORMAT or gamma is None:
        raise ValueError(f"{key}={str(path)!r}: not an Analytic-DPM Γ file (written by `{COMMAND}`)")
    if gamma.ndim != 1 or gamma.dtype != torch.float64 or not torch.isfinite(gamma).all():
        raise ValueError(f"{key}={str(path)!r}: Γ must be finite (T,) float64, got {tuple(gamma.shape)} {gamma.dtype}")
    return GammaFile(gamma=gamma, info=json.loads(meta.get("info", "{}")), path=str(path))


def default_clip_pixels(ddim: bool, beta_schedule: BetaSchedule | None) -> float:
    """The authors' ``clip_pixel`` (run_cifar10.py): DDIM 1; DDPM 2 on the linear schedule, 1 otherwise."""
    return 2.0 if not ddim and beta_schedule is BetaSchedule.LINEAR else 1.0


def last_noise_bound(clip_pixels: float) -> float:
    """The bound on σ² of the step into x_{τ_1}: (clip_pixels · 2/255 · sqrt(π/2))² (the code's sigma2_threshold)."""
    return (clip_pixels * 2.0 / 255.0 * math.sqrt(math.pi / 2.0)) ** 2


def analytic_variance(
    ab: torch.Tensor, ab_prev: torch.Tensor, gamma: torch.Tensor, lambda2: torch.Tensor, clip: bool = True
) -> dict[str, torch.Tensor]:
    """σ*² of the jumps τ_k → τ_{k−1} (eq. 7 / Theorem 1), all (K,) float64.

    Args:
        ab, ab_prev: ᾱ_{τ_k} and ᾱ_{τ_{k−1}} (ᾱ_prev = 1 before τ_1).
        gamma: Γ_{τ_k}, the model's moment at the jump's upper timestep.
        lambda2: λ² of the forward family (β̃ for DDPM, η² β̃ for DDIM).
        clip: clip to Theorem 2's bounds (0 ≤ v ≤ ((b − a)/2)²).

    Returns ``sigma2`` (clipped when ``clip``), ``unclipped``, ``lower`` (= λ²) and ``upper`` (Theorem 2)."""
    bbar, bbar_prev = 1.0 - ab, 1.0 - ab_prev
    x0_var = bbar / ab * (1.0 - gamma)  # E Cov[x_0 | x_n] per dimension (cov_x_0_pred)
    coef = (ab_prev.sqrt() - ((bbar_prev - lambda2).clamp(min=0.0) * ab / bbar).sqrt()) ** 2  # coeff_cov_x_0
    unclipped = lambda2 + coef * x0_var
    upper = lambda2 + coef * X0_HALF_RANGE**2
    sigma2 = lambda2 + coef * x0_var.clamp(0.0, X0_HALF_RANGE**2) if clip else unclipped
    return {"sigma2": sigma2, "unclipped": unclipped, "lower": lambda2.clone(), "upper": upper}


class AnalyticVariance:
    """The part of a sampler that ``variance_type=analytic`` adds: Γ (from ``gamma``: a path or a (T,) tensor) and
    the σ² of the sampler's own steps. Mixed into :class:`AncestralSampler` and :class:`DDIMSampler`."""

    supports_analytic = True
    markov = True  # λ² = β̃ (Analytic-DDPM); DDIMSampler: False, λ² = η² β̃ (Analytic-DDIM)
    variance_type: VarianceType

    def _init_analytic(self, gamma: str | Path | torch.Tensor | None, clip_pixels: float | None) -> None:
        if clip_pixels is not None and not clip_pixels > 0:
            raise ValueError(
                f"sampler.analytic_clip_pixels={clip_pixels}: expected > 0 (.inf: no clip; null: the paper's)"
            )
        self.analytic_clip_pixels = clip_pixels
        self._gamma_source, self.gamma_file = gamma, None

    @property
    def analytic(self) -> bool:
        return self.variance_type is VarianceType.ANALYTIC

    def gamma(self) -> torch.Tensor:
        """Γ (T,) float64, read once; an error naming the command that writes it when there is none."""
        if self.gamma_file is None:
            source = self._gamma_source
            if source is None:
                raise ValueError(
                    f"sampler.variance_type=analytic needs Γ_n of the model: write it with `{COMMAND}`; sample.py and "
                    f"eval.py ckpt=CKPT then find <ckpt stem>{GAMMA_SUFFIX} beside it (or set sampler.gamma=PATH)"
                )
            tensor = torch.as_tensor(source, dtype=torch.float64) if isinstance(source, torch.Tensor) else None
            self.gamma_file = GammaFile(tensor) if tensor is not None else read_gamma(source)
        gamma, T = self.gamma_file.gamma, self.diffusion.num_timesteps
        if gamma.shape != (T,):
            raise ValueError(f"sampler.gamma: Γ has {tuple(gamma.shape)} entries but the model has T={T} timesteps")
        return gamma

    def analytic_sigma2(self, ascending: torch.Tensor, ab: torch.Tensor, ab_prev: torch.Tensor, lambda2: torch.Tensor):
        """σ² (K,) float64 of the steps ``ascending``: eq. 7 clipped to Theorem 2, the step into x_{τ_1} clipped to
        the last-step bound, no noise at the last step (index 0)."""
        sigma2 = analytic_variance(ab, ab_prev, self.gamma()[ascending], lambda2)["sigma2"]
        pixels = self.analytic_clip_pixels
        if pixels is None:
            pixels = default_clip_pixels(not self.markov, getattr(self.diffusion, "beta_schedule", None))
        if sigma2.numel() > 1 and math.isfinite(pixels):
            sigma2[1] = sigma2[1].clamp(max=last_noise_bound(pixels))
        sigma2[0] = 0.0
        return sigma2


def verify_gamma_weights(module: nn.Module, where: str) -> None:
    """A Γ file of ``module.sampler`` estimated for other weights than ``module.net``'s is an error (the file records
    their sha256: :func:`state_dict_sha256` of the network)."""
    gamma_file = getattr(getattr(module, "sampler", None), "gamma_file", None)
    if gamma_file is None or "weights_sha256" not in gamma_file.info:
        return
    recorded, ours = gamma_file.info["weights_sha256"], state_dict_sha256(module.net)
    if recorded != ours:
        raise ValueError(
            f"sampler.gamma={gamma_file.path!r} was estimated for other weights (ckpt={gamma_file.info.get('ckpt')!r}"
            f", weights={gamma_file.info.get('weights')}, sha256 {recorded[:12]}…) than {where} "
            f"(sha256 {ours[:12]}…): write this model's with `{COMMAND}` (the same weights=)"
        )


def with_gamma_path(sampler_cfg: Any, ckpt: str | Path, settings: set[str] | None) -> Any:
    """The sampler config (a DictConfig) with ``gamma`` filled in (``<ckpt stem>.analytic.safetensors``) when it
    samples with ``variance_type=analytic``, its sampler takes a ``gamma`` (``settings``: the keys it takes) and none
    is given; otherwise unchanged."""
    if str(sampler_cfg.get("variance_type") or "").lower() != VarianceType.ANALYTIC.value:
        return sampler_cfg
    if not settings or "gamma" not in settings:
        return sampler_cfg
    if sampler_cfg.get("gamma") is None:
        path = gamma_path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(
                f"sampler.variance_type=analytic needs Γ_n of this model (Analytic-DPM), which is not beside the "
                f"checkpoint ({str(path)!r}): write it once with `python src/analytic.py ckpt={ckpt}`, or set "
                "sampler.gamma=PATH"
            )
        sampler_cfg.gamma = str(path)
    return sampler_cfg

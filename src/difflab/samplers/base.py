"""The contract every sampler keeps (modelled on diffusers' schedulers).

    sampler.set_timesteps(num_steps)
    for t in sampler.timesteps:                      # descending, values in [0, T)
        model_output = net(x, t)                      # in the model's parameterisation
        x = sampler.step(model_output, t, x, generator=g).prev_sample

Samplers read the schedule (a :class:`GaussianDiffusion`) and never own a copy of it.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass

import torch

from difflab.samplers.thresholding import dynamic_threshold
from difflab.schedules import (
    GaussianDiffusion,
    NoiseLevel,
    Parameterization,
    VarianceType,
    eps_from_x0,
    x0_eps_from_output,
)
from difflab.utils.enums import StrEnumChoice, parse_enum


@dataclass
class SamplerOutput:
    """``prev_sample``: x at the next (earlier) timestep, (B, C, H, W); ``pred_x0``: the x̂_0 used for it."""

    prev_sample: torch.Tensor
    pred_x0: torch.Tensor


class Spacing(StrEnumChoice):
    """How K sampling steps are picked from [0, T) (indices; index T−1 is the paper's t = T).

    - ``even``: round(i (T−1)/(K−1)), i < K: both 0 and T−1 included (improved-diffusion's "K" with one section,
      to the index; diffusers' "linspace" breaks some ties x.5 the other way). For K = 1 it is [T−1] (one step
      from pure noise at t = T), where both of those give [0] (a "sample" that is the initial noise itself).
    - ``leading``: 0, s, 2s, …, (K−1)s with s = T // K (diffusers' "leading" with ``steps_offset=0``). When K
      divides T it equals ``ddim_uniform``; otherwise it keeps the stride T // K and stops early (K = 7, T = 1000:
      ends at 852, where ``ddim_uniform`` ends at 858).
    - ``ddim_uniform``: range(0, T, s) with the smallest integer stride s that gives exactly K steps
      (improved-diffusion's "ddimK", the DDIM paper's uniform τ); an error when no stride does (T = 1000, K = 37).
    - ``trailing``: round(T − i T/K) − 1: starts at T−1, i.e. t = T (diffusers' "trailing"; its float ``arange``
      breaks some exact ties x.5 the other way, e.g. K = 48, T = 1000, and can return K + 1 steps).
    - ``quadratic``: ⌊(linspace(0, sqrt(0.8 T), K))²⌋ (the DDIM paper's CIFAR-10 setting, as its code).
    """

    EVEN = "even"
    LEADING = "leading"
    DDIM_UNIFORM = "ddim_uniform"
    TRAILING = "trailing"
    QUADRATIC = "quadratic"


PROCESS_SAMPLERS = {  # what to choose instead, per process, for the error above
    "flow": (
        "use sampler=flow_euler, flow_heun or flow_ode (sample.py: or '~sampler', the checkpoint's own); a flow has "
        "no score, so the Langevin and predictor-corrector samplers do not apply"
    ),
    "sigma": (
        "use a σ-space sampler: sampler=heun | edm | euler | euler_ancestral | euler_maruyama | dpmpp_2m | "
        "dpmpp_2m_sde | dpmpp_3m | unipc"
    ),
    "gaussian": "choose a diffusion sampler",
}


def check_steps(num_steps: int, num_timesteps: int) -> int:
    """``num_steps`` when 1 <= steps <= T (the model's number of timesteps), for every sampler, the continuous-σ ones
    included (more steps than the model has levels only costs time); else a ValueError naming ``sampler.steps``."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"sampler.steps={num_steps}: expected 1 <= steps <= T={num_timesteps} (the model's timesteps)")
    return num_steps


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: Spacing | str = Spacing.EVEN) -> torch.Tensor:
    """K distinct indices in [0, T), ascending, chosen by ``spacing``."""
    spacing = parse_enum(Spacing, spacing, "sampler.spacing")
    T, K = num_timesteps, check_steps(num_steps, num_timesteps)
    if spacing is Spacing.EVEN:  # the stride accumulated as improved-diffusion does (the same ties at x.5)
        stride = (T - 1) / (K - 1) if K > 1 else 0.0
        steps, position = [], 0.0
        for _ in range(K):
            steps.append(round(position))
            position += stride
        steps = [T - 1] if K == 1 else steps
    elif spacing is Spacing.LEADING:
        steps = list(range(0, T, T // K))[:K]
    elif spacing is Spacing.DDIM_UNIFORM:
        steps = next((list(range(0, T, s)) for s in range(1, T + 1) if len(range(0, T, s)) == K), None)
        if steps is None:
            raise ValueError(
                f"sampler.spacing=ddim_uniform: no integer stride gives exactly steps={K} in T={T}; "
                "use spacing=leading or another number of steps"
            )
    elif spacing is Spacing.TRAILING:
        steps = sorted(round(T - i * T / K) - 1 for i in range(K))
    else:
        steps = sorted({int(v) for v in torch.linspace(0, (0.8 * T) ** 0.5, K, dtype=torch.float64) ** 2})
        if len(steps) < K:
            raise ValueError(
                f"sampler.spacing=quadratic gives only {len(steps)} distinct steps for steps={K}, T={T}; "
                "use fewer steps or another spacing"
            )
    return torch.tensor(steps, dtype=torch.long)


class Sampler(abc.ABC):
    """Base class: holds the schedule reference, the parameterisation and the current timestep sequence.

    Args:
        diffusion: the process whose ᾱ the sampler reads.
        parameterization: what the network outputs (``eps`` | ``x0`` | ``v``); set by the model.
        model_variance_type: the model's variance (``fixed_small`` | ``fixed_large`` | ``learned_range``); set by
            the model.
        variance_type: optional override from the sampler config: between the two fixed variances, or ``analytic``
            (Analytic-DPM, :mod:`difflab.samplers.analytic`) in the samplers that have it (DDPM, DDIM).
        clip_denoised: clamp x̂_0 to [-1, 1] before it is used (static thresholding).
        dynamic_threshold: if set, Imagen's dynamic thresholding of x̂_0 at this percentile (e.g. 0.995), applied
            instead of the static clip.
        steps: default number of sampling steps K (None: T); K < T respaces.
        spacing: which K steps (:class:`Spacing`: even | leading | ddim_uniform | trailing | quadratic).

    ``process_kinds``: the processes the sampler integrates (``gaussian``: :class:`GaussianDiffusion`; ``sigma``:
    :class:`~difflab.schedules.SigmaProcess`, EDM and the score SDEs; ``flow``:
    :class:`~difflab.schedules.RectifiedFlow`); a sampler built for another model's process is an error.
    ``init_noise_sigma``: the standard deviation of the chain's starting noise x_T (diffusers' name): 1 for the
    variance-preserving and flow processes, σ_0 of the chain for a σ process (EDM: x_0 = σ_max n).
    """

    process_kinds: tuple[str, ...] = ("gaussian",)
    init_noise_sigma = 1.0
    MODEL_ARGUMENTS = ("diffusion", "parameterization", "model_variance_type")  # filled by the model

    @classmethod
    def setting_names(cls) -> set[str]:
        """The keyword arguments a config may set (``sampler.KEY``): every ``__init__`` up the MRO to the first one
        without ``**kwargs``, less what the model fills in."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = inspect.signature(init).parameters.values()
            names.update(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return names - {"self", *cls.MODEL_ARGUMENTS}

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        parameterization: str | Parameterization = Parameterization.EPS,
        model_variance_type: str | VarianceType = VarianceType.FIXED_SMALL,
        variance_type: str | VarianceType | None = None,
        clip_denoised: bool = True,
        steps: int | None = None,
        dynamic_threshold: float | None = None,
        spacing: str | Spacing = Spacing.EVEN,
    ) -> None:
        process = getattr(diffusion, "process_kind", "gaussian")
        if str(variance_type).lower() == VarianceType.ANALYTIC.value and process != "gaussian":
            raise ValueError(
                f"sampler.variance_type=analytic: Analytic-DPM's optimal variance is that of the discrete Gaussian "
                f"(DDPM) chain's reverse steps; this model's process is a {process} ({type(diffusion).__name__}), "
                "which has none"
            )
        self.check_process_kind(diffusion)
        self.diffusion = diffusion
        self.parameterization = parse_enum(Parameterization, parameterization, "model.parameterization")
        model_variance = parse_enum(VarianceType, model_variance_type, "model.variance_type")
        if not model_variance.trainable:
            raise ValueError(
                "model.variance_type=analytic: Analytic-DPM's variance is a sampling choice, not a training one: train "
                "with fixed_small (or fixed_large), then sample with sampler.variance_type=analytic"
            )
        self.variance_type = model_variance
        if variance_type is not None:
            self.variance_type = parse_enum(VarianceType, variance_type, "sampler.variance_type")
            self._check_variance_override(model_variance)
        self.clip_denoised = clip_denoised
        self.spacing = parse_enum(Spacing, spacing, "sampler.spacing")
        self.dynamic_threshold = dynamic_threshold
        if dynamic_threshold is not None and not 0.0 < dynamic_threshold <= 1.0:
            raise ValueError(f"sampler.dynamic_threshold={dynamic_threshold}: expected a percentile in (0, 1]")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"sampler.steps={steps!r}: expected a number of steps >= 1 (or null: all T steps)")
        self.num_steps = diffusion.num_timesteps if steps is None else steps
        self.timesteps = torch.empty(0, dtype=torch.long)
        self.nfe = 0  # network evaluations of the current chain, counted by sample_loop
        self.set_timesteps(self.num_steps)

    def _check_variance_override(self, model_variance: VarianceType) -> None:
        """fixed_small and fixed_large replace each other; ``analytic`` (Analytic-DPM) replaces either, in the
        samplers that have it (DDPM, DDIM); a learned variance is neither replaced nor a replacement."""
        chosen = self.variance_type
        if chosen is VarianceType.ANALYTIC and not model_variance.learned:
            if not getattr(self, "supports_analytic", False):
                raise ValueError(
                    f"sampler.variance_type=analytic: {type(self).__name__} has no reverse variance to set; "
                    "Analytic-DPM samples with sampler=ddpm or sampler=ddim"
                )
            return
        if model_variance.learned or chosen.learned or chosen is VarianceType.ANALYTIC:
            raise ValueError(
                f"sampler.variance_type={chosen.value!r}: a model trained with "
                f"model.variance_type={model_variance.value!r} must sample with its own variance (Σ_θ); "
                "only fixed_small, fixed_large and analytic can replace each other (analytic: for fixed-variance "
                "models)"
            )

    def check_process_kind(self, diffusion) -> None:
        """A sampler of one process (Gaussian diffusion, flow) refuses a model of the other, naming the fix."""
        process = getattr(diffusion, "process_kind", "gaussian")
        if process not in self.process_kinds:
            raise ValueError(
                f"{type(self).__name__} samples a {' or '.join(self.process_kinds)} process but the model's process "
                f"is a {process} ({type(diffusion).__name__}): "
                + PROCESS_SAMPLERS.get(process, "choose a diffusion sampler")
            )

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.num_timesteps

    def num_evaluations(self, num_steps: int | None = None) -> int:
        """Network evaluations (NFE) of one chain of ``num_steps`` steps: one per entry of ``timesteps``, which is
        one per step except for samplers that evaluate twice per step (Heun)."""
        return self.num_steps if num_steps is None else num_steps

    def set_timesteps(self, num_steps: int | None = None) -> None:
        """Choose the sub-sequence of [0, T) to visit; ``self.timesteps`` becomes it in descending order."""
        num_steps = self.num_steps if num_steps is None else num_steps  # 0 is an error, not "the default"
        self.nfe = 0
        ascending = spaced_timesteps(self.num_timesteps, num_steps, self.spacing)
        self.timesteps = ascending.flip(0)
        self._index = {int(t): i for i, t in enumerate(ascending.tolist())}
        self._on_set_timesteps(ascending)

    def step_index(self, t: int | torch.Tensor) -> int:
        """Position of ``t`` in the ascending sequence (0 is the last denoising step)."""
        try:
            return self._index[int(t)]
        except KeyError:
            raise ValueError(f"timestep {int(t)} is not in this sampler's sequence; call set_timesteps first") from None

    def predict(
        self, model_output: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor, clip: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x̂_0, ε̂, variance output or None) from a raw network output at timestep ``t``; ``clip`` overrides
        the sampler's thresholding (False: none, as inversion needs)."""
        t_batch = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        return self.predict_at(model_output, x_t, self.diffusion.noise_level(t_batch, x_t), clip)

    def predict_at(
        self, model_output: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel, clip: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As :meth:`predict` at any noise level (the continuous-time solvers' σ), in fp32, thresholded: static
        (``clip_denoised``) or dynamic (``dynamic_threshold``), ε̂ recomputed from the thresholded x̂_0."""
        mean_output, var_output = self.diffusion.split_output(model_output, self.variance_type)
        clip = self.clip_denoised if clip is None else clip
        static = clip and self.dynamic_threshold is None
        x0, eps = x0_eps_from_output(self.parameterization, mean_output.float(), x_t.float(), level, static)
        if clip and self.dynamic_threshold is not None:
            x0 = dynamic_threshold(x0, self.dynamic_threshold)
            eps = eps_from_x0(x_t.float(), x0, level)
        return x0, eps, var_output

    @abc.abstractmethod
    def _on_set_timesteps(self, ascending: torch.Tensor) -> None:
        """Precompute the per-step coefficients for ``ascending`` (K,) timesteps."""

    @abc.abstractmethod
    def step(
        self,
        model_output: torch.Tensor,
        t: int | torch.Tensor,
        x_t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SamplerOutput:
        """One reverse step from x_t (B, C, H, W) at timestep ``t`` to the previous timestep of the sequence."""

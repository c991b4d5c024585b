"""LatentConsistencyModule: latent consistency distillation (Luo et al. 2023, "LCM", Algorithm 1) of a latent
diffusion teacher, guidance folded in: :class:`ConsistencyModule`'s distillation (its loss, target network θ⁻,
checkpoint state and teacher record) on :class:`LatentDiffusionModule`'s latents, autoencoder and conditioner.

What LCM changes in CD, and where it lives here:
- the consistency function is LCM's discrete-time one, f = c_skip(t) x_t + c_out(t) x̂_0 with c at s·t
  (:class:`LCMBoundary`, LCM eq. 9), not CM's σ one, so that ``sampler=lcm`` (diffusers' ``LCMScheduler``)
  samples it as trained; it is evaluated in the σ view (x_t = α_t x̃) that :class:`ConsistencyModule` works in;
- the teacher's solver is one DDIM step over k = ``skip`` timesteps on the grid [0, k − 1, 2k − 1, …, T − 1]
  (LCM §4.3, "skipping-step"; :func:`skipping_grid`, :func:`ddim_step`), pairs drawn uniformly;
- guidance (LCM §4.2): w ~ U[w_min, w_max] per example, the teacher steps with its CFG output at w
  (its ``model_fn``: ε̃ = (1 + w) ε_c − w ε_∅, *the same convention as LCM's ω*: ε_c + ω (ε_c − ε_∅), so w = ω;
  diffusers' pipelines take guidance_scale = ω + 1 and subtract 1), and the student gets w as a network input
  (``net.guidance_embed``, zero-initialised: it starts as the teacher's conditional network);
- sampling evaluates the network once per step with w as its input (no CFG doubling).
The condition the loss carries is the pair (c, w) (:class:`GuidedCondition`; LCM's f_θ(z, ω, c, t)). The w input's
plumbing is shared with guidance distillation (:mod:`difflab.modules.guided`); a sampling w outside the trained range
warns here (LCM extrapolates) where guidance distillation refuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from difflab.modules.autoencoder import LoadedCheckpoint
from difflab.modules.consistency import ConsistencyMode, ConsistencyModule
from difflab.modules.guided import (
    GuidanceInputMixin,
    GuidedCondition,
    check_w_range,
    load_teacher_net,
    with_guidance_input,
)
from difflab.modules.latent_diffusion import LatentDiffusionModule
from difflab.samplers import Sampler
from difflab.samplers.lcm import LCMSampler
from difflab.schedules.consistency import denoised, expand, sigma_level
from difflab.schedules.latent_consistency import LCMBoundary, ddim_step, skipping_grid
from difflab.utils.checkpoint_io import load_checkpoint
from difflab.utils.hashing import state_dict_sha256

log = logging.getLogger(__name__)

__all__ = ["GuidedCondition", "LatentConsistencyModule", "latent_teacher_checkpoint"]


def latent_teacher_checkpoint(path: str) -> LoadedCheckpoint:
    """The teacher's checkpoint as read (it carries its stage 1), refused unless it is a latent diffusion one."""
    content = load_checkpoint(path, "model.teacher_ckpt")
    if not content.get("autoencoder_config"):
        target = (content.get("difflab") or {}).get("config", {}).get("model", {}).get("_target_")
        raise ValueError(
            f"model.teacher_ckpt={path!r}: a {target} checkpoint; experiment=latent_consistency distils a latent "
            "diffusion teacher (python src/train.py experiment=ldm); a pixel-space teacher distils with "
            "experiment=consistency_distill"
        )
    return LoadedCheckpoint(str(path), content)


class LatentConsistencyModule(GuidanceInputMixin, ConsistencyModule, LatentDiffusionModule):
    """``model=latent_consistency`` (``experiment=latent_consistency model.teacher_ckpt=<an LDM checkpoint>``).

    Args (LatentDiffusionModule's and ConsistencyModule's ``target_decay``, ``metric``, ``huber_c``; the others of
    ConsistencyModule do not apply):
        teacher_ckpt: the latent diffusion teacher; the student is its network (plus the w input), autoencoder,
            conditioner and latent scale, and ``src/train.py`` gives it the teacher's net, data shape, schedule,
            parameterization and conditioner (``teacher_model_keys``).
        autoencoder_ckpt: null: the teacher's own stage 1 (its checkpoint carries it); another must be the same
            weights.
        skip: k, the teacher's DDIM step in timesteps (LCM: 20 of T = 1000, a grid of T/k = 50 points).
        w_min, w_max: the range of the guidance scale w drawn per example (our and LCM's convention, above).
        guidance_embed_dim: sinusoid features of w (diffusers' ``time_cond_proj_dim``: 256).
        timestep_scaling, sigma_data: s and σ_d of c_skip, c_out (10 and 0.5, diffusers').
        guidance_scale: the default w of ``sample()``; within [w_min, w_max].
    """

    teacher_model_keys = ("schedule", "parameterization", "conditioner")

    def __init__(
        self,
        net: Callable[..., torch.nn.Module],
        *args: Any,
        teacher_ckpt: str | None = None,
        autoencoder_ckpt: Any = None,
        skip: int = 20,
        w_min: float = 0.0,
        w_max: float = 3.0,
        guidance_embed_dim: int = 256,
        timestep_scaling: float = 10.0,
        sigma_data: float = 0.5,
        **kwargs: Any,
    ) -> None:
        conditional = kwargs.get("conditioner") is not None
        self.check_arguments(teacher_ckpt, autoencoder_ckpt, w_min, w_max, conditional, kwargs)
        if autoencoder_ckpt is None:  # the teacher's own stage 1, from its checkpoint (read here once, checked)
            autoencoder_ckpt = latent_teacher_checkpoint(teacher_ckpt)
        if conditional:  # the w input, zero-initialised (the teacher's weights load around it)
            net = with_guidance_input(net, guidance_embed_dim)
        schedule = kwargs.get("schedule")
        grid = skipping_grid(schedule.num_timesteps, int(skip)) if schedule is not None else None  # checked first
        self.__dict__.update(boundary=LCMBoundary(timestep_scaling, sigma_data), skip=int(skip), guided=conditional)
        self.__dict__["w_range"] = check_w_range(w_min, w_max)
        super().__init__(
            net,
            *args,
            autoencoder_ckpt=autoencoder_ckpt,
            mode=ConsistencyMode.DISTILLATION,
            teacher_ckpt=teacher_ckpt,
            **kwargs,
        )
        self.few_step_method = "latent_consistency"
        self.grid_points = skipping_grid(self.diffusion.num_timesteps, self.skip) if grid is None else grid
        self.sampler = self.build_sampler_bound(self.sampler)
        self._warned: set[float] = set()

    @staticmethod
    def check_arguments(teacher_ckpt, autoencoder_ckpt, w_min, w_max, conditional, kwargs) -> None:
        if teacher_ckpt is None and autoencoder_ckpt is None:
            raise ValueError(
                "model.teacher_ckpt=null: latent consistency distillation needs a latent diffusion teacher "
                "(a checkpoint of python src/train.py experiment=ldm)"
            )
        if (
            kwargs.pop("teacher_guidance_scale", None) is not None
            or kwargs.pop("mode", "distillation") != "distillation"
        ):
            raise ValueError(
                "model.teacher_guidance_scale / model.mode: latent consistency distillation draws the teacher's w "
                "per example from [model.w_min, model.w_max] and has no training mode"
            )
        check_w_range(w_min, w_max)
        default_w = kwargs.get("guidance_scale", 0.0)
        if conditional and not w_min <= default_w <= w_max:
            raise ValueError(
                f"model.guidance_scale={default_w}: the default w must lie in the trained range "
                f"[model.w_min, model.w_max] = [{w_min}, {w_max}]"
            )
        if not conditional and w_max > 0:
            raise ValueError(
                f"model.w_max={w_max}: the model is unconditional (model.conditioner=null), so there is no guidance "
                "to fold in; set model.w_min=0 model.w_max=0"
            )

    # ------------------------------------------------------------------ construction
    def check_teacher_kind(self, teacher, kind: str, where: str) -> None:
        """A latent diffusion teacher (not itself a latent consistency model) of the student's autoencoder."""
        if not isinstance(teacher, LatentDiffusionModule) or isinstance(teacher, ConsistencyModule):
            raise ValueError(
                f"{where}: a {type(teacher).__name__} ({kind} process); experiment=latent_consistency distils a "
                "latent diffusion teacher (python src/train.py experiment=ldm); a pixel-space teacher distils with "
                "experiment=consistency_distill"
            )
        if state_dict_sha256(teacher.autoencoder) != state_dict_sha256(self.autoencoder):
            raise ValueError(
                f"{where}: model.autoencoder_ckpt={self.autoencoder_source!r} is not the teacher's autoencoder; leave "
                "it null (the teacher's own)"
            )

    def start_from_teacher(self) -> None:
        """θ (and θ⁻) start as the teacher's network, the w input at zero; the conditioner and the latent scale are
        the teacher's."""
        teacher, where = self.teacher, f"model.teacher_ckpt={self.teacher_record['ckpt']!r}"
        load_teacher_net(self.net, teacher.net, where)
        if self.conditioner is not None:
            try:
                self.conditioner.load_state_dict(teacher.conditioner.state_dict())
            except (RuntimeError, AttributeError) as error:
                raise ValueError(
                    f"{where}: its conditioner does not match model.conditioner ({str(error).splitlines()[0]}); "
                    "leave conditioner to the teacher"
                ) from None
        self.scale_factor, self.scale_set = float(teacher.scale_factor), True

    def build_sampler_bound(self, sampler: Sampler) -> Sampler:
        """An :class:`LCMSampler` samples on this model's grid (T/k points) with its c_skip, c_out."""
        grid = self.__dict__.get("grid_points")
        if isinstance(sampler, LCMSampler) and grid is not None:
            return sampler.bind(len(grid) - 1, self.boundary)
        return super().build_sampler_bound(sampler)

    # ------------------------------------------------------------------ the network and f
    def net_denoise(self, net, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        """``net`` (θ or θ⁻) at latents x (B, C, h, w), t (B,) under ``y``: a :class:`GuidedCondition` (w reaches the
        network's w input) or a plain condition (w = 0)."""
        cond, w = (y.cond, y.w) if isinstance(y, GuidedCondition) else (y, None)
        extra = {"w": w} if self.guided else {}
        x = self.net_input(x)
        if self.conditioner is None:
            return net(x, t, **extra)
        if cond is None:  # an unconditional call: the null condition
            cond = self.conditioner.null(x.shape[0], x.device)
        context, mask = self.conditioner(cond)
        return net(x, t, context=context, context_mask=mask, **extra)

    def consistency_output(self, net, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        """LCM's f(x_t, t) = c_skip(t) x_t + c_out(t) x̂_0 (B, C, h, w) at x̃ = x_t/α_t (B, C, h, w), σ_t and t (B,)."""
        fn = lambda x_in, t_in: self.net_denoise(net, x_in, t_in, y)  # noqa: E731
        x0 = denoised(self.diffusion, self.parameterization, fn, x, sigma, t)
        alpha = expand(sigma_level(self.diffusion, sigma).alpha, x0)
        return self.boundary(alpha * x.to(x0.dtype), x0, t)

    def teacher_step(self, x: torch.Tensor, start: tuple, end: tuple, y: GuidedCondition) -> torch.Tensor:
        """LCM's x̂_{t_n}: one DDIM step of the teacher's CFG output at each example's w, from t_{n+k} to t_n."""
        teacher = self.teacher
        fn = teacher.model_fn(y.cond, y.w) if self.guided else teacher.model_fn(None)
        solver = lambda x_in, s, t: denoised(teacher.diffusion, teacher.parameterization, fn, x_in, s, t)  # noqa: E731
        with torch.no_grad():
            return ddim_step(solver, x, start, end)

    # ------------------------------------------------------------------ the loss
    def grid(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(σ (N,), t (N,), uniform pair probabilities (N − 1,), N) of the skipping grid [0, k − 1, …, T − 1]."""
        key = (-1, str(device))
        if key not in self._grids:
            t = self.grid_points
            sigmas = self.diffusion.continuous.sigmas[t]
            probs = torch.full((len(t) - 1,), 1.0 / (len(t) - 1), dtype=torch.float64)
            self._grids = {key: tuple(v.to(device, torch.float32) for v in (sigmas, t, probs))}
        return (*self._grids[key], len(self.grid_points))

    def current_scales(self) -> int:
        return len(self.grid_points)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, *_ = batch
        return super().training_step((self.encode(x, self.cached(x)), y), batch_idx)

    def training_condition(self, y: torch.Tensor) -> GuidedCondition:
        """(the conditioner's condition, w ~ U[w_min, w_max] (B,)) (LCM Alg. 1, line 3)."""
        return GuidedCondition(super().training_condition(y), self.draw_w(y.shape[0], y.device))

    def _eval_loss(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """The loss at w = (w_min + w_max)/2 (comparable curves)."""
        x, y, *_ = batch
        w = torch.full((x.shape[0],), sum(self.w_range) / 2, device=x.device)
        cond = GuidedCondition(self.condition(y), w)
        return super()._eval_loss((self.encode(x, self.cached(x)), cond), batch_idx)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the target network θ⁻
        LatentDiffusionModule.setup(self, stage)  # model.cache_latents

    # ------------------------------------------------------------------ sampling
    def check_guidance_scale(self, w: float) -> None:
        """A sampling w outside the trained [w_min, w_max] extrapolates the w input: a warning (once per w)."""
        lo, hi = self.w_range
        if not lo <= w <= hi and w not in self._warned:
            self._warned.add(w)
            log.warning(
                "guidance_scale=%s is outside the range this latent consistency model was trained on "
                "[model.w_min, model.w_max] = [%s, %s]: its w input extrapolates",
                w,
                lo,
                hi,
            )

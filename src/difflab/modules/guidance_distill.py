"""Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", §3): a classifier-free
guided teacher (two network evaluations per step) becomes a student that takes the guidance scale w as an input (one
evaluation per step), then halves its steps. ``experiment=guidance_distill``: :class:`ProgressiveDistillationModule`
with ``model.w_min``/``model.w_max`` set, through this mixin.

Stage one (§3.1), ``model.guidance_steps`` optimizer steps: a w-conditioned student x̂_η(z_t, w), started from the
teacher's weights with its w input at zero (:mod:`difflab.modules.guided`: it starts as the teacher's conditional
network, w = 0), learns the teacher's guided x̂ at w, per example w ~ U[w_min, w_max]:

    x̂^w_θ(z_t) = (1 + w) x̂_θ(z_t, c) − w x̂_θ(z_t, ∅)        (CFG, our w; linear, so it is the same combination of
                                                             ε̂ or v̂: the teacher's ``model_fn`` at w, converted)
    L_η = max(SNR_t, 1) ‖x̂_η(z_t, w) − x̂^w_θ(z_t)‖²        (progressive distillation's truncated-SNR weight)

at t on the trailing grid of N_0 = ``start_steps`` points, i ~ U{1..N_0} (:func:`guidance_target`); its checkpoint
``guided_<N_0>steps.ckpt`` samples with N_0 DDIM steps, one evaluation each.
Stage two (§3.2): progressive distillation's rounds from the stage-one model: the teacher's two DDIM steps and the
student's one at the example's w, teacher and student both one-evaluation w-conditioned networks. Sampling:
``src/sample.py ckpt=<round ckpt> guidance_scale=w`` (``model.guidance_scale``, recorded, is the default), a w outside
[w_min, w_max] refused.

Simplified from the paper: t is drawn from the N_0 points stage two evaluates the stage-one model at, not t ~ U[0, 1];
the w input is LCM's (the sinusoid of 1000 w through a zero-initialised linear map, :mod:`difflab.networks.embeddings`);
x̂^w is thresholded as the student's sampler thresholds (clip to [−1, 1] by default), as progressive distillation's
teacher steps are (from the cosine schedule's t = T an ε teacher's x̂ amplifies its error 1/α ≈ 2e4 times); sampling is
DDIM η = 0 only (their stochastic N-step sampler, §3.3, is not built).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from difflab.modules.guided import GuidanceInputMixin, GuidedCondition, check_w_range, with_guidance_input
from difflab.modules.progressive_math import level_of, truncated_snr_weight
from difflab.schedules import NoiseLevel, x0_eps_from_output


def guidance_target(
    teacher_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    parameterization: Any,
    z_t: torch.Tensor,
    t: torch.Tensor,
    at: NoiseLevel,
    clip_denoised: bool,
) -> torch.Tensor:
    """Stage one's target x̂^w_θ(z_t) (B, C, H, W): the x̂ of the teacher's guided output ``teacher_fn(z_t, t)`` (its
    ``model_fn`` with labels and w (B,) bound) in its ``parameterization``, at z_t (B, C, H, W), t (B,), level
    ``at``."""
    with torch.no_grad():
        return x0_eps_from_output(parameterization, teacher_fn(z_t, t).float(), z_t, at, clip_denoised)[0]


class GuidanceDistillationMixin(GuidanceInputMixin):
    """Stage one and the w input of :class:`ProgressiveDistillationModule` (mixed in first). Sets ``guided``,
    ``w_range`` and ``guidance_steps`` (0: no stage one) from the module's arguments (:meth:`guidance_arguments`)."""

    guidance_steps = 0

    def guidance_arguments(
        self, net: Callable, w_min: Any, w_max: Any, guidance_steps: Any, embed_dim: int, teacher_w: Any
    ) -> Callable:
        """Check the guidance keys (before the module builds anything; the teacher's side, class-conditional and a
        guided teacher's range, is :meth:`check_guided_teacher`'s) and return the network factory: with the w input
        when the w range is set. ``teacher_w``: ``model.teacher_guidance_scale``."""
        if (w_min is None) != (w_max is None):
            raise ValueError(
                f"model.w_min={w_min}, model.w_max={w_max}: set both (guidance distillation: w ~ U[w_min, w_max]) or "
                "neither (a fixed w, model.teacher_guidance_scale)"
            )
        if isinstance(guidance_steps, bool) or not isinstance(guidance_steps, int) or guidance_steps < 0:
            raise ValueError(f"model.guidance_steps={guidance_steps!r}: expected a whole number >= 0")
        guided = w_min is not None
        if guidance_steps and not guided:
            raise ValueError(
                f"model.guidance_steps={guidance_steps}: stage one (guidance distillation) needs the w range "
                "model.w_min, model.w_max (a teacher already distilled at one fixed w cannot be guidance-distilled)"
            )
        if guided:
            w_range = check_w_range(w_min, w_max)
            if teacher_w is not None:
                raise ValueError(
                    f"model.teacher_guidance_scale={teacher_w}: with model.w_min/model.w_max "
                    "the teacher's w is drawn per example from that range; set it to null"
                )
            self.__dict__.update(guided=True, w_range=w_range)
            net = with_guidance_input(net, embed_dim)
        self.__dict__["guidance_steps"] = guidance_steps
        return net

    def default_guidance_scale(self, guidance_scale: float | None) -> float:
        """``model.guidance_scale``: unguided, 0 (the student samples unguided: the guided teacher is what it learns);
        w-conditioned, the default sampling w (null: the teacher's own; without a teacher, w_min), within
        [w_min, w_max]. Checkpoints record the resolved value."""
        if not self.guided:
            if guidance_scale:
                raise ValueError(
                    f"model.guidance_scale={guidance_scale}: the student samples unguided (0); the teacher's guidance "
                    "is distilled into it at model.teacher_guidance_scale (or give model.w_min/model.w_max for a "
                    "w-conditioned student)"
                )
            return 0.0
        lo, hi = self.w_range
        teacher = self.teacher
        w = guidance_scale if guidance_scale is not None else lo if teacher is None else teacher.guidance_scale
        if not lo <= w <= hi:
            raise ValueError(
                f"model.guidance_scale={w}{' (the teacher’s)' if guidance_scale is None else ''}: the default w must "
                f"lie in the trained range [model.w_min, model.w_max] = [{lo}, {hi}]"
            )
        return float(w)

    def check_guided_teacher(self, teacher: Any, where: str) -> None:
        """A w range needs a class-conditional teacher; a guidance-distilled teacher (w as its input) passes on its
        range (the student's within it) and has no stage one left."""
        teacher_guided = bool(getattr(teacher, "guided", False))
        if self.guided and not teacher.num_classes:
            raise ValueError(
                f"model.w_min={self.w_range[0]}, model.w_max={self.w_range[1]}: the teacher is unconditional "
                f"({where}); guidance distillation needs a class-conditional teacher (model=cfg)"
            )
        if teacher_guided and not self.guided:
            raise ValueError(
                f"{where}: the teacher takes w as an input (trained on [{teacher.w_range[0]}, {teacher.w_range[1]}]); "
                "set model.w_min/model.w_max within that range"
            )
        if self.guided and not teacher_guided and getattr(teacher, "few_step_method", None):
            raise ValueError(
                f"{where}: a {teacher.few_step_method} checkpoint distilled at one fixed w; guidance distillation "
                "starts from the classifier-free guided teacher itself (model=cfg)"
            )
        if teacher_guided:
            (lo, hi), (tlo, thi) = self.w_range, teacher.w_range
            if not tlo <= lo <= hi <= thi:
                raise ValueError(
                    f"model.w_min={lo}, model.w_max={hi}: outside the teacher's trained range [{tlo}, {thi}] ({where})"
                )
            if self.guidance_steps:
                raise ValueError(
                    f"model.guidance_steps={self.guidance_steps}: the teacher already takes w as an input ({where}); "
                    "set model.guidance_steps=0 to go on halving its steps (experiment=progressive_distill)"
                )

    # ------------------------------------------------------------------ the network and stage one's loss
    def call_net(self, net: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, y, w: torch.Tensor | None = None):
        """``net`` (the student's, or a frozen copy) at x_t (B, C, H, W), t (B,), labels y (B,) and, when guided, w (B,)
        (None: 0)."""
        extra = {"w": w} if self.guided else {}
        return net(self.net_input(x_t), t, y if self.num_classes else None, **extra)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        cond, w = (y.cond, y.w) if isinstance(y, GuidedCondition) else (y, None)
        return self.call_net(self.net, x_t, t, cond, w)

    def guidance_loss(
        self, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, i: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        """Per-example loss (B,) of stage one at points i ∈ [1, N_0] (B,) of the N_0 grid, data x, noise ε
        (B, C, H, W), w (B,): max(SNR_t, 1) · mean ‖x̂_η(z_t, w) − x̂^w_θ(z_t)‖² (see the module docstring)."""
        grid_t, grid_ab = self._grid_t.to(x.device), self._grid_ab.to(x.device, torch.float32)
        at = level_of(grid_ab[i].reshape(-1, *([1] * (x.ndim - 1))))
        t = grid_t[i - 1]
        z_t = at.alpha * x + at.std * noise
        target = guidance_target(*self.teacher_fn(y, w), z_t, t, at, self.sampler.clip_denoised)
        x_hat = self.student_x0(z_t, t, y, w, at)
        return truncated_snr_weight(grid_ab[i]) * (x_hat - target).square().flatten(1).mean(1)

    def guidance_record(self) -> dict[str, Any]:
        """What ``checkpoint["distillation"]`` adds: the w range (None: a fixed w), the default sampling w and the
        length of stage one."""
        return {
            "w_range": list(self.w_range) if self.guided else None,
            "guidance_scale": self.guidance_scale if self.guided else None,
            "guidance_steps": self.guidance_steps,
        }

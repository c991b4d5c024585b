"""A w-conditioned student: the guidance scale w as a network input, so that guided sampling takes one network
evaluation per step instead of classifier-free guidance's two. Shared by latent consistency distillation (Luo et al.
2023 §4.2, LCM's f_θ(z, ω, c, t)) and guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion
Models": x̂_η(z_t, w)).

- The network gains ``net.guidance_embed`` (:class:`difflab.networks.embeddings.GuidanceEmbedding`, UNet and DiT):
  w's sinusoid features through a zero-initialised linear map, added to the timestep features, so the student
  starts as its teacher's *conditional* network (w = 0) whatever w it is given (:func:`with_guidance_input`,
  :func:`load_teacher_net`).
- In training, w ~ U[w_min, w_max] per example (:meth:`GuidanceInputMixin.draw_w`) and the teacher's target comes
  from its CFG output at that w: ε̃ = (1 + w) ε_c − w ε_∅ (our convention: w = 0 is conditional sampling; LCM's ω
  and Meng et al.'s w are the same w; diffusers' ``guidance_scale`` is w + 1).
- The condition the module's ``forward`` takes is the pair (c, w) (:class:`GuidedCondition`); sampling binds w =
  ``guidance_scale`` (:meth:`GuidanceInputMixin.model_fn`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch


class GuidedCondition(NamedTuple):
    """A w-conditioned student's condition: ``cond`` (labels or the conditioner's condition (B, …); None: the null
    one) and w (B,)."""

    cond: torch.Tensor | None
    w: torch.Tensor


def with_guidance_input(net: Callable[..., torch.nn.Module], dim: int) -> Callable[..., torch.nn.Module]:
    """The network factory ``net`` with the w input (``guidance_embed``) of ``dim`` sinusoid features."""
    return functools.partial(net, guidance_embed=True, guidance_embed_dim=int(dim))


def check_w_range(w_min: Any, w_max: Any) -> tuple[float, float]:
    """(w_min, w_max) as floats, refused unless 0 <= w_min <= w_max (w = 0: conditional sampling)."""
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in (w_min, w_max)) or not 0 <= w_min <= w_max:
        raise ValueError(f"model.w_min={w_min}, model.w_max={w_max}: expected 0 <= w_min <= w_max")
    return float(w_min), float(w_max)


def load_teacher_net(student: torch.nn.Module, teacher: torch.nn.Module, where: str) -> None:
    """The student's network ← the teacher's weights; the student's w input (absent from a teacher without one) stays
    at its zero initialisation. Any other mismatch is an error naming ``where`` (the teacher's key and path)."""
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    missing = [k for k in missing if "guidance_embed." not in k]
    if missing or unexpected:
        raise ValueError(
            f"{where}: its network does not match the student's net (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); leave net to the teacher"
        )


class GuidanceInputMixin:
    """For a module whose network may take w as an input (mixed in before the module's class).

    The module sets ``self.guided`` (whether its network has the w input) and ``self.w_range`` (w_min, w_max);
    its ``forward(x, t, y)`` must accept a :class:`GuidedCondition` as ``y`` when guided.
    :meth:`check_guidance_scale` decides what a sampling w outside the range means (here: an error).
    """

    guided = False
    w_range: tuple[float, float] = (0.0, 0.0)

    def draw_w(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """w ~ U[w_min, w_max] (B,), one per example (LCM Alg. 1 line 3; Meng et al. §3.1's p_w)."""
        lo, hi = self.w_range
        return lo + (hi - lo) * torch.rand(batch_size, device=device)

    def check_guidance_scale(self, w: float) -> None:
        """A sampling w outside [w_min, w_max] is refused: the w input was never trained there."""
        lo, hi = self.w_range
        if not lo <= w <= hi:
            raise ValueError(
                f"guidance_scale={w}: this model takes w as a network input, trained on [model.w_min, model.w_max] "
                f"= [{lo}, {hi}]; choose a w in that range"
            )

    def model_fn(self, y: torch.Tensor | None, guidance_scale: float | torch.Tensor = 0.0) -> Callable[..., Any]:
        """``fn(x_t, t)``: one network evaluation with w = ``guidance_scale`` (a float, or a tensor (B,) of one w per
        example) as the network's input, no CFG doubling; unguided models: the module's own ``model_fn``."""
        if not self.guided:
            return super().model_fn(y, guidance_scale)  # type: ignore[misc]
        if isinstance(guidance_scale, torch.Tensor):
            w = guidance_scale
        else:
            if guidance_scale < 0:
                raise ValueError(f"guidance_scale={guidance_scale}: expected >= 0 (0 = conditional sampling)")
            self.check_guidance_scale(float(guidance_scale))
            w = torch.tensor(float(guidance_scale))
        fn = lambda x, t: self(x, t, GuidedCondition(y, w.to(x.device).expand(x.shape[0])))  # noqa: E731
        guidance = getattr(self, "classifier_guidance", None)  # sample.py classifier_ckpt=...: guided on top
        if guidance is None or y is None:
            return fn
        return guidance.wrap(fn, y, self.diffusion, self.parameterization, self.image_shape[0])

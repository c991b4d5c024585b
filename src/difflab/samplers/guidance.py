"""Classifier-free guidance (Ho & Salimans 2022; survey Method 5.12) as a wrapper of the model function,
so every sampler (ancestral, respaced, DDIM) gets it for free.

Convention (the seed's): ε̃ = (1 + w) ε_θ(x_t, c) − w ε_θ(x_t, ∅) with ``guidance_scale`` = w ≥ 0;
w = 0 is plain conditional sampling. Papers that write s · ε_c + (1 − s) ε_∅ use s = 1 + w.
The conditional and unconditional evaluations run as one batched forward of size 2B.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LabelledModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def classifier_free_guidance(
    model_fn: LabelledModelFn,
    y: torch.Tensor,
    null_label: int | torch.Tensor,
    guidance_scale: float | torch.Tensor,
    mean_channels: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``fn(x_t, t)`` giving the guided output for conditions ``y`` (labels (B,), or any (B, ...) tensor).

    ``null_label`` is the null class index, or the unconditional condition itself (a tensor shaped like ``y``, e.g.
    the tokens of the empty caption).

    Guidance is linear in the network output, so it is the same for ε, x_0 and v parameterisations.
    With a learned variance only the first ``mean_channels`` channels are guided; the variance channels are
    the conditional ones (as in GLIDE). ``guidance_scale`` may be a tensor (B,): one w per example (latent
    consistency distillation draws w per example, Luo et al. 2023 §4.2).
    """
    per_example = isinstance(guidance_scale, torch.Tensor)
    if not per_example and guidance_scale < 0:  # a tensor's w are the caller's to check (no device sync here)
        raise ValueError(f"guidance_scale={guidance_scale}: expected >= 0 (0 = conditional sampling)")

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not per_example and guidance_scale == 0:
            return model_fn(x_t, t, y)
        null = torch.full_like(y, null_label) if isinstance(null_label, int) else null_label.to(y.device)
        both = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = both.chunk(2, dim=0)
        channels = mean_channels or cond.shape[1]
        w = guidance_scale.to(cond).reshape(-1, *([1] * (cond.ndim - 1))) if per_example else guidance_scale
        mean = (1 + w) * cond[:, :channels] - w * uncond[:, :channels]
        return torch.cat([mean, cond[:, channels:]], dim=1)

    return guided

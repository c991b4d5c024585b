"""Thresholding of the predicted x̂_0, needed for large guidance weights."""

from __future__ import annotations

import torch


def dynamic_threshold(x0: torch.Tensor, percentile: float = 0.995) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): per sample, s = max(1, the ``percentile``
    quantile of |x̂_0|); clip x̂_0 to [−s, s] and divide by s. x0: (B, ...). Leaves in-range samples unchanged."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"sampler.dynamic_threshold={percentile}: expected a percentile in (0, 1]")
    flat = x0.flatten(1).abs()
    s = torch.quantile(flat.float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))
    return x0.clamp(-s, s) / s

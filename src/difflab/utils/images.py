"""Saving generated images: grids (torchvision) and .npz arrays, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from difflab.utils.paths import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, C) uint8 in [0, 255] (the layout of guided-diffusion's .npz)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] → one (3 or 1, H', W') grid in [0, 1], ``nrow`` images per row (default √N)."""
    nrow = nrow or max(1, math.isqrt(images.shape[0] - 1) + 1)
    return make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write ``images`` (N, C, H, W) in [-1, 1] as one PNG grid; returns the path."""
    with atomic_write(path) as file:
        save_image(image_grid(images, nrow), file, format="png")
    return Path(path)


def save_npz(
    images: torch.Tensor,
    path: str | Path,
    labels: torch.Tensor | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``arr_0`` = uint8 (N, H, W, C) images (and ``labels`` if given, and the ``extra`` arrays: e.g. the
    prompts, class names, sampler; strings as unicode arrays, readable without pickle) to a .npz file."""
    path = Path(path)
    arrays = {"arr_0": to_uint8(images)}
    if labels is not None:
        arrays["labels"] = labels.detach().cpu().numpy()
    for key, value in (extra or {}).items():
        if key in arrays:
            raise ValueError(f"save_npz: extra array {key!r} would replace the images or labels")
        arrays[key] = np.asarray(value)
    with atomic_write(path) as file:
        np.savez(file, **arrays)
    return path

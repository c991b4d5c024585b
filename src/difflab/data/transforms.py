"""Vectorised uint8 image transforms and the in-memory dataset built on them.

Images stay uint8 (N, C, S, S) in memory (4x smaller than float32); each batch is converted to
float32 in [-1, 1] in one vectorised step, and horizontally flipped per sample when asked.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

_CHUNK = 4096  # images resized per call, bounds the float32 temporary memory
_LUMA = (299, 587, 114)  # ITU-R 601-2 weights (x1000), as PIL's "L" mode


def to_uint8_images(array: np.ndarray | torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Return a uint8 (N, C, H, W) tensor from (N, H, W), (N, C, H, W) or, if ``channels_last``, (N, H, W, C)."""
    images = torch.as_tensor(np.asarray(array))
    if images.dtype != torch.uint8:
        images = images.round().clamp(0, 255).to(torch.uint8)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    elif channels_last:
        images = images.permute(0, 3, 1, 2)
    if images.ndim != 4:
        raise ValueError(f"expected images of 3 or 4 dimensions, got shape {tuple(images.shape)}")
    return images.contiguous()


def to_luminance(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> uint8 luminance (N, 1, H, W)."""
    weights = torch.tensor(_LUMA, dtype=torch.int32).view(1, 3, 1, 1)
    luma = (images.to(torch.int32) * weights).sum(1, keepdim=True) + 500  # +500: round to nearest
    return luma.div(1000, rounding_mode="floor").to(torch.uint8)


def fit_to_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size).

    28x28 -> 32x32 pads 2 px per side with 0 (the background, -1 once scaled); other sizes use
    antialiased bilinear resizing (a non-square image is stretched).
    """
    height, width = images.shape[-2:]
    if (height, width) == (size, size):
        return images
    if (height, width) == (28, 28) and size == 32:
        return F.pad(images, (2, 2, 2, 2), value=0)
    chunks = [_resize_chunk(images[i : i + _CHUNK], size) for i in range(0, len(images), _CHUNK)]
    return torch.cat(chunks) if chunks else images.new_zeros((0, images.shape[1], size, size))


def _resize_chunk(images: torch.Tensor, size: int) -> torch.Tensor:
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def prepare_images(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C', size, size) with C' = 1 if ``channels`` is 1 else C.

    RGB asked as 1 channel becomes luminance; grayscale asked as 3 channels keeps 1 stored channel
    (``InMemoryImageDataset`` repeats it per batch, saving memory).
    """
    if channels == 1 and images.shape[1] == 3:
        images = to_luminance(images)
    return fit_to_size(images, size).contiguous()


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], any shape."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def random_hflip(x: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Flip the images of (B, C, H, W) horizontally where ``flips`` (B,) is true; without ``flips``, each with
    probability 1/2 from the global RNG of x's device (training draws its flips from the epoch order instead)."""
    if flips is None:
        flips = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flips.to(x.device).view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


def split_keys(keys: list) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Item keys → indices (B,) and flip decisions (B,) or None: a key is an index or, from the training order
    (:class:`difflab.data.order.EpochSampler`), an (index, flip) pair."""
    if keys and isinstance(keys[0], tuple):
        indices, flips = zip(*keys, strict=True)
        return torch.as_tensor(indices, dtype=torch.int64), torch.as_tensor(flips, dtype=torch.bool)
    return torch.as_tensor(keys, dtype=torch.int64), None


class StackedSamples(list):
    """A list of (x, y) samples that also keeps them stacked, so ``collate_images`` is free."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__(zip(x.unbind(0), y.unbind(0), strict=True))
        self.stacked = (x, y)


def collate_images(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Collate (x (C, S, S), y) samples into x (B, C, S, S) float32 and y (B,) int64."""
    if isinstance(samples, StackedSamples):
        return samples.stacked
    return tuple(default_collate(samples))


class BatchedDataset(Dataset):
    """A data set whose items are read a batch at a time: subclasses define ``batch(indices, flips)`` → (x, y)
    stacked; single items and the DataLoader's ``__getitems__`` (keys: indices, or (index, flip) pairs) go
    through it."""

    def batch(self, indices: torch.Tensor, flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(*split_keys([key]))
        return x[0], y[0]

    def __getitems__(self, keys: list) -> StackedSamples:
        return StackedSamples(*self.batch(*split_keys(keys)))


class InMemoryImageDataset(BatchedDataset):
    """uint8 images (N, C, S, S) and int64 labels (N,); items are (x float32 (channels, S, S) in [-1, 1], y)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int, random_flip: bool = False) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.channels = channels
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: torch.Tensor, flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` (B,) stacked: x (B, channels, S, S) float32 in [-1, 1], y (B,), on the images' device;
        with ``random_flip``, flipped where ``flips`` (B,) says (drawn at random without it)."""
        x = self.images[indices]
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)
        x = to_unit_range(x)
        if self.random_flip:
            x = random_hflip(x, flips)
        return x, self.labels[indices]

"""``ImageFolderDataModule``: any folder of png/jpg/jpeg/bmp/webp images, searched recursively.

Top-level subfolders are classes (label = index in sorted order) when ``class_subfolders=true`` and
some exist; images lying directly in ``data_dir`` are then ignored. Images are decoded lazily, per item:
converted to L or RGB, the shorter side resized to ``image_size`` (antialiased bilinear), then center-cropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from difflab.data.base import HeldOutTestDataModule, _check_bool, split_indices
from difflab.data.errors import CorruptImageError, DatasetNotFoundError
from difflab.data.transforms import random_hflip, to_unit_range

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


def _iter_images(directory: Path) -> Iterator[Path]:
    """Image files under ``directory``, recursively, skipping hidden files and folders."""
    for path in directory.rglob("*"):
        hidden = any(part.startswith(".") for part in path.relative_to(directory).parts)
        if path.suffix.lower() in IMAGE_EXTENSIONS and not hidden and path.is_file():
            yield path


def find_classes(directory: Path) -> list[str]:
    """Sorted names of the subfolders of ``directory`` that contain at least one image (recursively)."""
    if not directory.is_dir():
        return []
    subdirs = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [p.name for p in subdirs if next(_iter_images(p), None) is not None]


def load_image(path: Path, channels: int, size: int) -> torch.Tensor:
    """Decode ``path`` into uint8 (channels, size, size); raise ``CorruptImageError`` naming it on failure."""
    try:
        with Image.open(path) as raw:
            image = raw.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise CorruptImageError(f"corrupt or unreadable image: {path} ({type(err).__name__}: {err})") from err
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8).reshape(size, size, channels)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class ImageFileDataset(Dataset):
    """Image files decoded lazily; items are (x float32 (channels, size, size) in [-1, 1], y int64)."""

    def __init__(self, paths: list[Path], labels: torch.Tensor, channels: int, size: int, random_flip: bool = False):
        self.paths, self.labels = paths, torch.as_tensor(labels, dtype=torch.int64)
        self.channels, self.size, self.random_flip = channels, size, random_flip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """``key``: an index, or (index, flip) from the training order (:class:`difflab.data.order.EpochSampler`)."""
        index, flip = key if isinstance(key, tuple) else (key, None)
        x = to_unit_range(load_image(self.paths[index], self.channels, self.size))
        if self.random_flip:
            x = random_hflip(x.unsqueeze(0), None if flip is None else torch.tensor([flip]))[0]
        return x, self.labels[index]


class ImageFolderDataModule(HeldOutTestDataModule):
    """Images under ``data_dir``: x (B, channels, image_size, image_size) in [-1, 1], y (B,) class index or 0.

    ``num_classes`` is the number of class subfolders, or None without them (all labels 0).
    ``val_size`` and ``test_size`` images are carved from the sorted file list with ``seed``.
    ``verify=true`` decodes every file at setup so a corrupt one fails early.
    """

    in_memory = False  # images are decoded from files batch by batch

    def __init__(
        self,
        data_dir: str,
        *,
        channels: int = 3,
        val_size: int = 100,
        test_size: int = 100,
        random_flip: bool = True,
        class_subfolders: bool = True,
        verify: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_dir, channels=channels, val_size=val_size, test_size=test_size, random_flip=random_flip, **kwargs
        )
        self.class_subfolders = _check_bool("class_subfolders", class_subfolders)
        self.verify = _check_bool("verify", verify)
        self.classes = find_classes(self.data_dir) if class_subfolders else []
        self.num_classes = len(self.classes) or None
        self.class_names = tuple(self.classes)

    def scan(self) -> tuple[list[Path], torch.Tensor]:
        """Sorted image paths (N,) and their int64 labels (N,); raises ``DatasetNotFoundError`` if none."""
        if self.classes:
            pairs = [(p, i) for i, name in enumerate(self.classes) for p in _iter_images(self.data_dir / name)]
        else:
            pairs = [(p, 0) for p in _iter_images(self.data_dir)]
        pairs.sort(key=lambda pair: str(pair[0]))
        if not pairs:
            state = "is empty of images" if self.data_dir.is_dir() else "does not exist"
            raise DatasetNotFoundError(
                f"data.data_dir={self.data_dir} {state}: expected image files "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}), searched recursively, optionally in one "
                "subfolder per class. Point data.data_dir at your image folder."
            )
        return [p for p, _ in pairs], torch.tensor([label for _, label in pairs], dtype=torch.int64)

    def _build_splits(self) -> tuple[ImageFileDataset, ImageFileDataset, ImageFileDataset]:
        paths, labels = self.scan()
        if self.verify:
            for path in paths:
                load_image(path, self.channels, 8)
        held_out = self.val_size + self.test_size
        if held_out >= len(paths):
            raise ValueError(
                f"data.val_size + data.test_size = {held_out} leaves no training images out of "
                f"{len(paths)} in {self.data_dir}: lower them"
            )
        test_idx, val_idx, train_idx = split_indices(len(paths), (self.test_size, self.val_size), self.seed)
        train_idx = train_idx[: self.limit_train_size]

        def subset(idx: torch.Tensor, flip: bool) -> ImageFileDataset:
            return ImageFileDataset([paths[i] for i in idx.tolist()], labels[idx], self.channels, self.image_size, flip)

        return subset(train_idx, self.random_flip), subset(val_idx, False), subset(test_idx, False)

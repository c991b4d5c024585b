"""``ImageDataModule``: the base of every difflab data module (argument checks, splits, loaders).

Batches are ``(x, y)``: x float32 (B, channels, image_size, image_size) in [-1, 1], y int64 (B,)
class labels (zeros for unlabelled sets).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from difflab.data.device_batches import DeviceBatches
from difflab.data.order import EpochSampler, ResumableDataLoader
from difflab.data.transforms import InMemoryImageDataset, collate_images, prepare_images

DIGIT_NAMES = tuple(
    f"handwritten {d}" for d in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
)


def _check_int(key: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"data.{key}={value!r}: expected an integer >= {minimum}")
    return value


def _check_bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"data.{key}={value!r}: expected true or false")
    return value


def _check_auto_bool(key: str, value: object) -> bool | None:
    """true or false, or ``auto`` (None): decided once the trainer's device is known (true on a CUDA device)."""
    if value == "auto":
        return None
    if not isinstance(value, bool):
        raise ValueError(f"data.{key}={value!r}: expected true, false or auto")
    return value


def _check_image_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value & (value - 1):
        raise ValueError(
            f"data.image_size={value!r}: expected a power of two >= 8 (8, 16, 32, 64, ...), "
            "so that the U-Net can halve it at every level"
        )
    return value


def _check_data_dir(value: object) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"data.data_dir={value!r}: expected a non-empty path")
    return Path(value).expanduser()


def split_indices(n: int, sizes: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Deterministically split ``range(n)``: one sorted index tensor per entry of ``sizes``, then the rest.

    The same ``seed`` and ``n`` always give the same split; the remainder keeps the original order.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts, start = [], 0
    for size in (*sizes, n - sum(sizes)):
        parts.append(perm[start : start + size].sort().values)
        start += size
    return parts


class ImageDataModule(pl.LightningDataModule):
    """Base data module. ``train``/``val``/``test`` are ``Dataset``s of (x (C, S, S) float32 in [-1, 1], y int64).

    Subclasses implement ``_build_splits`` (usually via ``_in_memory_splits``) and set ``num_classes``.
    ``image_shape``, ``channels``, ``image_size`` and ``num_classes`` are known right after ``__init__``.
    """

    num_classes: int | None = None
    # whether ``train`` is an InMemoryImageDataset (decoded uint8 tensors), which ``on_device`` needs
    in_memory: bool = True
    # names of the classes (for synthetic captions of text-conditioned latent diffusion); [] when unknown
    class_names: tuple[str, ...] = ()
    # whether each epoch's training order is a fresh permutation (false: the stored order; data=streaming's option)
    shuffle: bool = True

    def __init__(
        self,
        data_dir: str,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        persistent_workers: bool = False,
        val_size: int = 5000,
        seed: int = 0,
        random_flip: bool = False,
        limit_train_size: int | None = None,
        on_device: bool | str = "auto",
    ) -> None:
        super().__init__()
        self.data_dir = _check_data_dir(data_dir)
        self.image_size = _check_image_size(image_size)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise ValueError(f"data.channels={channels!r}: expected 1 (grayscale) or 3 (RGB)")
        self.channels = int(channels)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.pin_memory = _check_auto_bool("pin_memory", pin_memory)
        self.persistent_workers = _check_bool("persistent_workers", persistent_workers)
        self.val_size = _check_int("val_size", val_size, 0)
        self.seed = _check_int("seed", seed, 0)
        self.random_flip = _check_bool("random_flip", random_flip)
        if limit_train_size is not None:
            _check_int("limit_train_size", limit_train_size, 1)
        self.limit_train_size = limit_train_size
        self.on_device = _check_auto_bool("on_device", on_device)
        if self.on_device and not self.in_memory:
            raise ValueError(
                f"data.on_device=true: {type(self).__name__} reads its images from files batch by batch; "
                "on_device needs an in-memory set (fashion_mnist, mnist, mnist_5k, digits, cifar10)"
            )
        self.train: Dataset | None = None
        self.val: Dataset | None = None
        self.test: Dataset | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, image_size, image_size) of one image."""
        return (self.channels, self.image_size, self.image_size)

    # --- splits ---------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        """Build ``train``, ``val`` and ``test`` (all stages at once; later calls are no-ops)."""
        if self.train is not None:
            return
        train, val, test = self._build_splits()
        if len(train) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} exceeds the {len(train)} training images "
                "(the train loader drops incomplete batches): lower data.batch_size"
            )
        self.train, self.val, self.test = train, val, test

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def _in_memory_splits(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        test: tuple[torch.Tensor, torch.Tensor] | None = None,
        test_size: int = 0,
    ) -> tuple[InMemoryImageDataset, InMemoryImageDataset, InMemoryImageDataset]:
        """Split uint8 (N, C, H, W) ``images`` and (N,) ``labels`` into train/val(/test) datasets.

        ``val_size`` (and, when there is no official ``test``, ``test_size``) images are held out
        with ``seed``; ``limit_train_size`` then keeps the first N remaining training images.
        """
        held_out = self.val_size + (0 if test is not None else test_size)
        if held_out >= len(images):
            keys = "data.val_size" + ("" if test is not None else " + data.test_size")
            raise ValueError(f"{keys} = {held_out} leaves no training images out of {len(images)}: lower it")
        if test is not None:
            val_idx, train_idx = split_indices(len(images), (self.val_size,), self.seed)
            test_images, test_labels = test
        else:
            test_idx, val_idx, train_idx = split_indices(len(images), (test_size, self.val_size), self.seed)
            test_images, test_labels = images[test_idx], labels[test_idx]
        train_idx = train_idx[: self.limit_train_size]
        return (
            self._tensor_dataset(images[train_idx], labels[train_idx], self.random_flip),
            self._tensor_dataset(images[val_idx], labels[val_idx], False),
            self._tensor_dataset(test_images, test_labels, False),
        )

    def _tensor_dataset(self, images: torch.Tensor, labels: torch.Tensor, flip: bool) -> InMemoryImageDataset:
        stored = prepare_images(images, self.channels, self.image_size)
        return InMemoryImageDataset(stored, labels, self.channels, random_flip=flip)

    # --- loaders --------------------------------------------------------------------------------

    def _on_cuda(self) -> bool:
        """Whether the attached trainer trains on a CUDA device (what ``auto`` switches on)."""
        trainer = self.trainer  # set by Lightning when the data module is attached to a Trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _resolved_on_device(self) -> bool:
        """``on_device``, with ``auto`` = on a CUDA device when the training set is the in-memory image set (not,
        e.g., latent diffusion's latent cache, which stays on the host)."""
        if self.on_device is not None:
            return self.on_device
        return self._on_cuda() and isinstance(self.train, InMemoryImageDataset)

    def _loader(self, dataset: Dataset, sampler: EpochSampler | None = None) -> DataLoader:
        """Training (``sampler`` given: resumable, in the epoch order, incomplete batches dropped) or evaluation
        batches in a fixed order."""
        return (DataLoader if sampler is None else ResumableDataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler is not None,
            num_workers=self.num_workers,
            pin_memory=self._on_cuda() if self.pin_memory is None else self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=collate_images,
        )

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        """Shuffled, ``drop_last=True`` batches of (x (B, C, S, S), y (B,)) in the (seed, epoch) order of
        :mod:`difflab.data.order` (resumable mid-epoch, this rank's share under DDP); with ``on_device``, gathered
        on the training device from a copy of the whole set there (:class:`DeviceBatches`)."""
        self.setup()
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        epoch = (lambda: trainer.current_epoch) if trainer else (lambda: 0)
        if not self._resolved_on_device():
            flip = bool(getattr(self.train, "random_flip", False))
            sampler = EpochSampler(
                len(self.train), self.batch_size, self.seed, epoch, rank, world_size, flip, self.shuffle
            )
            return self._loader(self.train, sampler)
        if not isinstance(self.train, InMemoryImageDataset):  # e.g. replaced by latent diffusion's latent cache
            raise ValueError(
                f"data.on_device=true needs the in-memory image set, but the training set is a "
                f"{type(self.train).__name__} (model.cache_latents=true? it keeps the latents on the host)"
            )
        return DeviceBatches(
            self.train,
            self.batch_size,
            trainer.strategy.root_device if trainer else "cpu",
            self.seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        self.setup()
        return self._loader(self.val)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        self.setup()
        return self._loader(self.test)


class HeldOutTestDataModule(ImageDataModule):
    """Base for sets without an official test split: ``test_size`` images are held out with ``seed`` as the test
    set. Subclasses change only the defaults; every other key is :class:`ImageDataModule`'s."""

    def __init__(self, data_dir: str = ".", *, test_size: int = 0, **kwargs: Any) -> None:
        super().__init__(data_dir, **kwargs)
        self.test_size = _check_int("test_size", test_size, 0)

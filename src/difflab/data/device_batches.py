"""Training batches drawn from a data set held whole in device memory (``data.on_device=true``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from difflab.data.order import ResumePoint, epoch_order
from difflab.data.transforms import InMemoryImageDataset


class DeviceBatches:
    """Shuffled, ``drop_last`` batches (x (B, C, S, S) float32 in [-1, 1], y (B,)) gathered on the device.

    Why not a DataLoader: for small sets (Fashion-MNIST at 32x32 is 61 MB as uint8) a fast GPU can outrun the
    DataLoader's per-batch host work and host→device copy. Here the uint8 set is copied to the device once; an epoch
    is one ``randperm`` and each batch one gather, with the conversion to [-1, 1] and the random flips on the device.

    The semantics are the DataLoader path's: reshuffled every epoch, incomplete batches dropped, and under DDP each
    rank takes a disjoint 1/world_size share of the permutation with the same number of batches on every rank. The
    order and the flips are :func:`~difflab.data.order.epoch_order`'s, seeded by (seed, epoch), so ranks agree
    without communicating; ``state_dict`` (epoch, batches handed out, items consumed) lets a run resumed mid-epoch
    continue with the next batch the uninterrupted run would have drawn.

    Args:
        dataset: the in-memory training set (its uint8 images and labels are copied to ``device``).
        epoch: returns the epoch about to start (``trainer.current_epoch``), read at each ``iter()``.
    """

    def __init__(
        self,
        dataset: InMemoryImageDataset,
        batch_size: int,
        device: torch.device | str,
        seed: int,
        epoch: Callable[[], int],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data = InMemoryImageDataset(
            dataset.images.to(device), dataset.labels.to(device), dataset.channels, dataset.random_flip
        )
        self.batch_size, self.seed, self.epoch = batch_size, seed, epoch
        self.rank, self.world_size = rank, world_size
        self.resume = ResumePoint(len(self), batch_size, world_size)
        self._epoch, self._batches, self._start = 0, 0, (0, 0)
        if len(self) == 0:
            raise ValueError(
                f"data.on_device=true: {len(self.data)} training images over {world_size} rank(s) make no full "
                f"batch of data.batch_size={batch_size}"
            )

    def __len__(self) -> int:
        return (len(self.data) // self.world_size) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.data.images.device
        self._epoch = int(self.epoch())
        self._start = self.resume.take(self._epoch)
        self._batches = self._start[0]
        share, flips = epoch_order(
            len(self.data),
            self.seed,
            self._epoch,
            self.rank,
            self.world_size,
            self.data.random_flip,
            device,
            start=self._start[1],
        )
        for start in range(0, (len(share) // self.batch_size) * self.batch_size, self.batch_size):
            batch = slice(start, start + self.batch_size)
            self._batches += 1
            # conversion and flips on the device
            yield self.data.batch(share[batch], None if flips is None else flips[batch])

    def state_dict(self) -> dict[str, int]:
        return self.resume.state(self._epoch, self._batches, self._start)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resume.load(state)

"""Training batches drawn from a data set held whole in device memory (``data.on_device=true``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from difflab.data.transforms import InMemoryImageDataset


class DeviceBatches:
    """Shuffled, ``drop_last`` batches (x (B, C, S, S) float32 in [-1, 1], y (B,)) gathered on the device.

    Why not a DataLoader: for small sets (Fashion-MNIST at 32x32 is 61 MB as uint8) a fast GPU can outrun the
    DataLoader's per-batch host work and host→device copy. Here the uint8 set is copied to the device once; an epoch
    is one ``randperm`` and each batch one gather, with the conversion to [-1, 1] and the random flips on the device.

    The semantics are the DataLoader path's: reshuffled every epoch, incomplete batches dropped, and under DDP each
    rank takes a disjoint 1/world_size share of the permutation (as ``DistributedSampler`` does) with the same number
    of batches on every rank. The permutation is seeded by (seed, epoch), so ranks agree without communicating and a
    resumed run sees the order it would have seen.

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
        if len(self) == 0:
            raise ValueError(
                f"data.on_device=true: {len(self.data)} training images over {world_size} rank(s) make no full "
                f"batch of data.batch_size={batch_size}"
            )

    def __len__(self) -> int:
        return (len(self.data) // self.world_size) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.data.images.device
        generator = torch.Generator(device=device).manual_seed(self.seed * 100_003 + int(self.epoch()))
        share = torch.randperm(len(self.data), generator=generator, device=device)[self.rank :: self.world_size]
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.data.batch(share[start : start + self.batch_size])  # conversion and flips on the device

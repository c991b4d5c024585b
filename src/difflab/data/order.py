"""The training order of an epoch as a function of (seed, epoch, rank), resumable in the middle of an epoch.

Both training paths draw their order here: :class:`EpochSampler` (the DataLoader path) and
:class:`~difflab.data.device_batches.DeviceBatches` (``data.on_device``). The order of epoch e is one permutation
seeded by (seed, e) — the same on every DDP rank, which takes every world_size-th item of it — plus, with random
flips, one flip decision per item from the same generator. Nothing depends on the global random state, on how many
workers load the data or on what ran before, so a run resumed from a checkpoint sees the uninterrupted run's items,
flips included, from the batch where it stopped (the loaders' ``state_dict``: the epoch and the batches already
handed to training, restored by Lightning's stateful-dataloader support).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

# A training item key is an index, or (index, flip) when the set flips at random: the flip decided by the order,
# not drawn in the dataset (whose random state a resumed run cannot replay).
ItemKey = int | tuple[int, bool]


def epoch_order(
    num_items: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    flip: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's items of epoch ``epoch``: indices (num_items // world_size,) and, with ``flip``, their flip
    decisions (same shape, bool; else None). Every rank gets the same number (the remainder is left out)."""
    generator = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
    permutation = torch.randperm(num_items, generator=generator, device=device)
    flips = torch.rand(num_items, generator=generator, device=device) < 0.5 if flip else None
    share = slice(rank, rank + world_size * (num_items // world_size), world_size)
    return permutation[share], None if flips is None else flips[share]


class ResumePoint:
    """Where an interrupted epoch resumes: (epoch, batches already trained), kept until that epoch is iterated."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches
        self.pending: tuple[int, int] | None = None

    def load(self, state: dict[str, Any]) -> None:
        """Take a ``{"epoch", "batches"}`` state.

        A state saved after the last batch of an epoch is kept as it is (all of that epoch's batches to skip): when
        ``max_steps`` stops a run on the last batch and validation is by steps (``check_val_every_n_epoch=null``),
        Lightning has not ended the epoch yet and re-enters it on resume, where it must get no batch; when the epoch
        had ended, the next one starts from its beginning and this point is never used."""
        epoch, batches = int(state["epoch"]), min(int(state["batches"]), self.num_batches)
        self.pending = (epoch, batches) if batches else None

    def skip(self, epoch: int) -> int:
        """Batches to skip at the start of ``epoch``."""
        return self.pending[1] if self.pending is not None and self.pending[0] == epoch else 0

    def take(self, epoch: int) -> int:
        """:meth:`skip`, once: the resume point is used up."""
        skip, self.pending = self.skip(epoch), None
        return skip


class EpochSampler(DistributedSampler):
    """Training sampler: this rank's items of :func:`epoch_order`, from the resume point when there is one.

    ``epoch`` returns the epoch about to be iterated (``trainer.current_epoch``), read when an iteration starts.
    Lightning's ``set_epoch`` is not used: it passes the count of epochs *processed*, which is one ahead when a run
    resumes from a checkpoint written at the end of an epoch cut short by ``max_steps``, while training continues
    that epoch. A ``DistributedSampler`` so that Lightning leaves it in place under DDP instead of wrapping it in its
    own (it is one: each rank takes a disjoint share, of equal size). Yields :data:`ItemKey` s.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        epoch: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = False,
    ) -> None:
        super().__init__(range(num_items), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.num_items, self.batch_size, self.flip, self.current_epoch = num_items, batch_size, flip, epoch
        self.resume = ResumePoint((num_items // world_size) // batch_size)

    def __len__(self) -> int:
        return self.num_items // self.num_replicas

    def __iter__(self) -> Iterator[ItemKey]:
        epoch = int(self.current_epoch())
        indices, flips = epoch_order(self.num_items, self.seed, epoch, self.rank, self.num_replicas, self.flip)
        start = self.resume.take(epoch) * self.batch_size
        if flips is None:
            yield from indices[start:].tolist()
        else:
            yield from zip(indices[start:].tolist(), flips[start:].tolist(), strict=True)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose ``state_dict`` is (epoch, batches handed out so far):
    Lightning saves it in checkpoints and restores it before the first batch of a resumed run.

    Counting at the loader (not in the sampler, which workers read ahead of training) gives the batches training
    has received; Lightning does not prefetch from a loader with a length. The wrapped iterator starts at the first
    ``next()``, once the epoch is known (with workers, a ``DataLoader`` reads its sampler already at ``iter()``,
    which Lightning calls before it restores the epoch counter).
    """

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        resumable = isinstance(sampler, EpochSampler)
        self._epoch = int(sampler.current_epoch()) if resumable else 0
        self._batches = sampler.resume.skip(self._epoch) if resumable else 0
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self, "_epoch", 0)), "batches": int(getattr(self, "_batches", 0))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.sampler, EpochSampler):
            self.sampler.resume.load(state)

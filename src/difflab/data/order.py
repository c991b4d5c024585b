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
    start: int = 0,
    shuffle: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This rank's items of epoch ``epoch`` from position ``start`` of the epoch's permutation on (the items before it
    were consumed, by all ranks together, before a resume): indices ((num_items − start) // world_size,) and, with
    ``flip``, their flip decisions (same shape, bool; else None). Every rank gets the same number (the remainder is
    left out). Rank r takes every world_size-th item, so after k batches of B on each of W ranks exactly the first
    W·k·B items are consumed, whatever W: a run resumed on another number of processes continues with the rest.
    ``shuffle=False``: the items in their stored order instead of the permutation (a shard set's file order; the
    flips are still drawn from (seed, epoch))."""
    generator = torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)
    if shuffle:
        permutation = torch.randperm(num_items, generator=generator, device=device)
    else:
        permutation = torch.arange(num_items, device=device)
    flips = torch.rand(num_items, generator=generator, device=device) < 0.5 if flip else None
    remaining = max(num_items - start, 0)
    share = slice(start + rank, start + rank + world_size * (remaining // world_size), world_size)
    return permutation[share], None if flips is None else flips[share]


class ResumePoint:
    """Where an interrupted epoch resumes: (epoch, batches already trained on this rank, items of the epoch's
    permutation consumed by all ranks), kept until that epoch is iterated."""

    def __init__(self, num_batches: int, batch_size: int = 1, world_size: int = 1) -> None:
        self.num_batches, self.items_per_batch = num_batches, batch_size * world_size
        self.pending: tuple[int, int, int] | None = None

    def load(self, state: dict[str, Any]) -> None:
        """Take a ``{"epoch", "batches", "items"}`` state (``items`` missing in older checkpoints: batches of this
        run's size on this run's ranks).

        A state saved after the last batch of an epoch is kept as it is (all of that epoch's items to skip): when
        ``max_steps`` stops a run on the last batch and validation is by steps (``check_val_every_n_epoch=null``),
        Lightning has not ended the epoch yet and re-enters it on resume, where it must get no batch; when the epoch
        had ended, the next one starts from its beginning and this point is never used."""
        epoch, batches = int(state["epoch"]), min(int(state["batches"]), self.num_batches)
        items = int(state.get("items", batches * self.items_per_batch))
        self.pending = (epoch, batches, items) if items else None

    def skip(self, epoch: int) -> int:
        """Batches already trained on this rank at the start of ``epoch``."""
        return self.pending[1] if self.pending is not None and self.pending[0] == epoch else 0

    def start(self, epoch: int) -> int:
        """Items of ``epoch``'s permutation consumed before the resume (0: start the epoch from its beginning)."""
        return self.pending[2] if self.pending is not None and self.pending[0] == epoch else 0

    def take(self, epoch: int) -> tuple[int, int]:
        """(:meth:`skip`, :meth:`start`), once: the resume point is used up."""
        point, self.pending = (self.skip(epoch), self.start(epoch)), None
        return point

    def state(self, epoch: int, batches: int, start: tuple[int, int]) -> dict[str, int]:
        """The state after ``batches`` batches of ``epoch`` on this rank, of which ``start`` = (batches, items) came
        before the resume."""
        items = start[1] + (batches - start[0]) * self.items_per_batch
        return {"epoch": epoch, "batches": batches, "items": items}


class EpochSampler(DistributedSampler):
    """Training sampler: this rank's items of :func:`epoch_order`, from the resume point when there is one.

    ``epoch`` returns the epoch about to be iterated (``trainer.current_epoch``), read when an iteration starts.
    Lightning's ``set_epoch`` is not used: it passes the count of epochs *processed*, which Lightning's checkpoint of
    an epoch cut short by ``max_steps`` counts one ahead while a resumed run continues that epoch (corrected on load
    by :class:`difflab.callbacks.CutEpochRestore`, but the order does not rely on it). A ``DistributedSampler`` so
    that Lightning leaves it in place under DDP instead of wrapping it in its own (it is one: each rank takes a
    disjoint share, of equal size). Yields :data:`ItemKey` s. ``shuffle=False``:
    the stored order (:func:`epoch_order`).
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
        shuffle: bool = True,
    ) -> None:
        super().__init__(
            range(num_items), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.num_items, self.batch_size, self.flip, self.current_epoch = num_items, batch_size, flip, epoch
        self.resume = ResumePoint((num_items // world_size) // batch_size, batch_size, world_size)

    def __len__(self) -> int:
        return self.num_items // self.num_replicas

    def __iter__(self) -> Iterator[ItemKey]:
        epoch = int(self.current_epoch())
        start = self.resume.take(epoch)[1]
        indices, flips = epoch_order(
            self.num_items, self.seed, epoch, self.rank, self.num_replicas, self.flip, start=start, shuffle=self.shuffle
        )
        if flips is None:
            yield from indices.tolist()
        else:
            yield from zip(indices.tolist(), flips.tolist(), strict=True)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochSampler` whose ``state_dict`` is (epoch, batches handed out so far, items
    of the epoch consumed by all ranks):
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
        self._start = (sampler.resume.skip(self._epoch), sampler.resume.start(self._epoch)) if resumable else (0, 0)
        self._batches = self._start[0]
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        epoch, batches, start = (
            getattr(self, "_epoch", 0),
            getattr(self, "_batches", 0),
            getattr(self, "_start", (0, 0)),
        )
        if isinstance(self.sampler, EpochSampler):
            return self.sampler.resume.state(int(epoch), int(batches), start)
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if isinstance(self.sampler, EpochSampler):
            self.sampler.resume.load(state)

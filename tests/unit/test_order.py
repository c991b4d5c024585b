"""The training order: a function of (seed, epoch, rank), flips included, resumable at any batch."""

from __future__ import annotations

import torch

from difflab.data.order import EpochSampler, ResumableDataLoader, epoch_order
from difflab.data.transforms import InMemoryImageDataset, collate_images
from tests.unit.test_device_batches import N, indexed_set, indices


def loader(epoch: list[int], flip: bool = False, rank: int = 0, world_size: int = 1, workers: int = 0):
    sampler = EpochSampler(N, 4, seed=3, epoch=lambda: epoch[0], rank=rank, world_size=world_size, flip=flip)
    return ResumableDataLoader(
        indexed_set(random_flip=flip),
        batch_size=4,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        collate_fn=collate_images,
    )


def flipped(batch) -> list[bool]:
    return (batch[0][:, 0, 0, -1] == 1.0).tolist()  # the marked column moved to the right edge


def test_order_and_flips_depend_only_on_seed_epoch_and_rank():
    a, b = epoch_order(N, 3, 0, flip=True), epoch_order(N, 3, 0, flip=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and 0 < int(a[1].sum()) < N
    assert not torch.equal(a[0], epoch_order(N, 3, 1)[0])
    torch.manual_seed(0)
    first = [flipped(x) for x in loader([0], flip=True)]
    torch.manual_seed(1)  # the global random state plays no part
    assert [flipped(x) for x in loader([0], flip=True)] == first


def test_ranks_take_disjoint_equal_shares():
    shares = [epoch_order(N, 3, 0, rank=r, world_size=3)[0] for r in range(3)]
    assert all(len(s) == N // 3 for s in shares)
    assert len(set(torch.cat(shares).tolist())) == 3 * (N // 3)


def test_a_loader_resumes_at_the_batch_it_stopped_with_the_same_items_and_flips():
    epoch = [2]
    whole = [(indices(x), flipped(x)) for x in loader(epoch, flip=True, workers=2)]
    first = loader(epoch, flip=True)
    seen = []
    for i, batch in enumerate(first):
        seen.append((indices(batch), flipped(batch)))
        if i == 4:
            state = first.state_dict()  # as a checkpoint in the middle of the epoch
            break
    assert state == {"epoch": 2, "batches": 5, "items": 20}
    resumed = loader(epoch, flip=True, workers=2)
    resumed.load_state_dict(state)
    rest = [(indices(x), flipped(x)) for x in resumed]
    assert seen + rest == whole
    assert resumed.state_dict() == {"epoch": 2, "batches": len(whole), "items": 4 * len(whole)}
    assert [indices(x) for x in resumed] == [i for i, _ in whole]  # the next pass of the epoch is whole again


def test_a_state_saved_at_the_end_of_an_epoch_resumes_at_the_next_one():
    epoch = [0]
    ended = loader(epoch)
    assert len(list(ended)) == len(ended)
    resumed = loader(epoch)
    resumed.load_state_dict(ended.state_dict())
    epoch[0] = 1
    assert [indices(x) for x in resumed] == [indices(x) for x in loader(epoch)]


def test_a_state_without_items_resumes_as_before():
    """Checkpoints from before the item count: batches of this run's size on this run's ranks."""
    resumed = loader([2])
    resumed.load_state_dict({"epoch": 2, "batches": 3})
    assert [indices(x) for x in resumed] == [indices(x) for x in loader([2])][3:]


def test_a_run_resumed_on_another_number_of_ranks_continues_with_the_unconsumed_items():
    """2 ranks stop after 2 batches each (16 items consumed); 1 rank, and then 3, resume the epoch: every item not
    yet seen comes next, none twice (the remainder that does not fill a batch on every rank is dropped)."""
    epoch = [1]
    two = [loader(epoch, rank=r, world_size=2) for r in range(2)]
    seen = []
    for ranked in two:
        for i, batch in enumerate(ranked):
            seen += indices(batch)
            if i == 1:
                break
    states = [ranked.state_dict() for ranked in two]
    assert states[0] == states[1] == {"epoch": 1, "batches": 2, "items": 16}
    for world in (1, 3):
        rest = []
        for r in range(world):
            resumed = loader(epoch, rank=r, world_size=world)
            resumed.load_state_dict(states[0])
            rest += [i for batch in resumed for i in indices(batch)]
        assert not set(seen) & set(rest) and len(rest) == len(set(rest))
        per_rank = (N - 16) // world
        assert len(rest) == world * (per_rank - per_rank % 4)  # full batches of 4 on every rank
        order = epoch_order(N, 3, 1)[0].tolist()
        assert set(seen) == set(order[:16]) and set(rest) <= set(order[16:])


def test_an_explicit_flip_key_overrides_the_random_one():
    data = InMemoryImageDataset(indexed_set().images, torch.arange(N), channels=1, random_flip=True)
    x, _ = data.__getitems__([(0, True), (1, False)]).stacked
    assert x[0, 0, 0, -1] == 1.0 and x[1, 0, 0, 0] == 1.0

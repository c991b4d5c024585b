"""ClassifierModule's ``augment_shift`` (the feature network v2's shift augmentation): every image is its own copy
translated by at most k pixels with the background (-1) padded in, drawn from the global generator; 0 is off."""

from __future__ import annotations

import functools

import pytest
import torch

from difflab.modules import ClassifierModule
from difflab.networks import ClassifierNet


def module(shift: int) -> ClassifierModule:
    return ClassifierModule(
        net=functools.partial(ClassifierNet, width=4, num_features=8),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        image_shape=(1, 8, 8),
        num_classes=3,
        augment_shift=shift,
    )


def offsets_of(original: torch.Tensor, shifted: torch.Tensor, k: int) -> tuple[int, int]:
    """The (dy, dx) in [-k, k]² that turns ``original`` (C, H, W) into ``shifted`` (-1 outside), found by search."""
    padded = torch.nn.functional.pad(original, (k, k, k, k), value=-1.0)
    h, w = original.shape[-2:]
    hits = [
        (dy - k, dx - k)
        for dy in range(2 * k + 1)
        for dx in range(2 * k + 1)
        if torch.equal(padded[:, dy : dy + h, dx : dx + w], shifted)
    ]
    assert hits, "not a translation of the input with -1 padding"
    return hits[0]


def test_each_image_is_translated_by_at_most_k_pixels_with_background_padding():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8) * 2 - 1  # values never equal to -1 exactly: padding is recognisable
    shifted = module(2).shift(x)
    assert shifted.shape == x.shape
    offsets = [offsets_of(x[i], shifted[i], 2) for i in range(len(x))]
    assert all(max(abs(dy), abs(dx)) <= 2 for dy, dx in offsets)
    assert len(set(offsets)) > 10  # drawn per image, not one shift for the batch


def test_shift_draws_from_the_global_generator_so_resume_replays_it():
    x = torch.rand(8, 1, 8, 8)
    torch.manual_seed(3)
    first = module(1).shift(x)
    torch.manual_seed(3)
    assert torch.equal(module(1).shift(x), first)


def test_training_step_shifts_only_when_asked(monkeypatch):
    seen = []
    for k in (0, 2):
        m = module(k)
        monkeypatch.setattr(m, "_step", lambda batch, stage, idx: seen.append(batch[0]) or torch.tensor(0.0))
        x = torch.rand(4, 1, 8, 8)
        m.training_step((x, torch.zeros(4, dtype=torch.long)), 0)
        assert torch.equal(seen[-1], x) == (k == 0)


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_a_bad_shift_is_refused_at_construction(bad):
    with pytest.raises(ValueError, match="model.augment_shift"):
        module(bad)

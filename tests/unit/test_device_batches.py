"""data.on_device: batches gathered from a device-resident copy of the set, with the DataLoader path's semantics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from difflab.data import DigitsDataModule
from difflab.data.device_batches import DeviceBatches
from difflab.data.transforms import InMemoryImageDataset

N = 50


def indexed_set(random_flip: bool = False) -> InMemoryImageDataset:
    """Image i is the constant i (so a batch tells which images it holds), with column 0 marked for flips."""
    images = torch.arange(N, dtype=torch.uint8).view(N, 1, 1, 1).expand(N, 1, 4, 4).clone()
    images[..., 0] = 255
    return InMemoryImageDataset(images, torch.arange(N), channels=1, random_flip=random_flip)


def indices(batch: tuple[torch.Tensor, torch.Tensor]) -> list[int]:
    x, y = batch
    ids = torch.round((x[:, 0, 0, 1] + 1) * 127.5).long()
    assert torch.equal(ids, y)  # labels travel with their images
    return ids.tolist()


def epoch(batches: DeviceBatches) -> list[list[int]]:
    return [indices(b) for b in batches]


def test_an_epoch_is_a_shuffled_drop_last_pass():
    batches = DeviceBatches(indexed_set(), 8, "cpu", seed=0, epoch=lambda: 0)
    first = epoch(batches)
    assert len(first) == len(batches) == N // 8 and all(len(b) == 8 for b in first)
    flat = [i for b in first for i in b]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(N)) and flat != sorted(flat)
    x, _ = next(iter(batches))
    assert x.dtype == torch.float32 and x.shape == (8, 1, 4, 4) and x.min() >= -1 and x.max() <= 1


def test_order_follows_seed_and_epoch():
    current = [0]
    batches = DeviceBatches(indexed_set(), 8, "cpu", seed=0, epoch=lambda: current[0])
    a, b = epoch(batches), epoch(batches)
    current[0] = 1
    c = epoch(batches)
    assert a == b and a != c  # resumable: the order depends only on (seed, epoch)


def test_ranks_take_disjoint_shares_with_equal_batch_counts():
    shares = [DeviceBatches(indexed_set(), 4, "cpu", seed=3, epoch=lambda: 0, rank=r, world_size=2) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == (N // 2) // 4
    seen = [{i for b in epoch(s) for i in b} for s in shares]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == len(shares[0]) * 4


def test_random_flip_flips_some_images():
    torch.manual_seed(0)
    x, _ = next(iter(DeviceBatches(indexed_set(random_flip=True), 32, "cpu", seed=0, epoch=lambda: 0)))
    flipped = x[:, 0, 0, -1] == 1.0  # the marked column moved to the right edge
    assert 0 < int(flipped.sum()) < 32 and bool((x[~flipped, 0, 0, 0] == 1.0).all())


def test_too_few_images_for_a_batch_fails_clearly():
    with pytest.raises(ValueError, match="make no full batch of data.batch_size=64"):
        DeviceBatches(indexed_set(), 64, "cpu", seed=0, epoch=lambda: 0)


def test_data_module_uses_device_batches_only_when_asked():
    dm = DigitsDataModule(batch_size=16, on_device=True)
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches) and len(loader) == len(dm.train) // 16
    assert not isinstance(DigitsDataModule(batch_size=16, on_device=False).train_dataloader(), DeviceBatches)


def _attached(dm, device: str):
    """``dm`` as Lightning leaves it once attached to a Trainer on ``device`` (only the part the module reads)."""
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))
    return dm


def test_auto_loading_switches_on_for_cuda_only():
    """on_device=auto and pin_memory=auto (the configs' default): off without a trainer and on a CPU, on for a
    CUDA trainer; explicit true/false win; a training set that is not the in-memory image set (latent diffusion's
    latent cache) stays on the host under auto."""
    dm = DigitsDataModule(batch_size=16)
    assert dm.on_device is None and dm.pin_memory is None  # auto
    assert not isinstance(dm.train_dataloader(), DeviceBatches) and not dm.train_dataloader().pin_memory
    _attached(dm, "cpu")
    assert not dm._resolved_on_device() and not dm.val_dataloader().pin_memory
    _attached(dm, "cuda")
    assert dm._resolved_on_device() and dm.val_dataloader().pin_memory
    dm.train = torch.utils.data.TensorDataset(torch.zeros(32, 1, 8, 8))  # e.g. a latent cache
    assert not dm._resolved_on_device()
    fixed = _attached(DigitsDataModule(batch_size=16, on_device=False, pin_memory=False), "cuda")
    assert not fixed._resolved_on_device() and not fixed.val_dataloader().pin_memory


@pytest.mark.parametrize("key", ["on_device", "pin_memory"])
def test_auto_keys_refuse_other_values(key):
    with pytest.raises(ValueError, match=f"data.{key}='yes': expected true, false or auto"):
        DigitsDataModule(**{key: "yes"})


def test_on_device_refuses_file_streaming_sets(tmp_path):
    from difflab.data import ImageFolderDataModule

    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="data.on_device=true: ImageFolderDataModule reads its images from files"):
        ImageFolderDataModule(str(tmp_path), on_device=True)

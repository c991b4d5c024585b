"""``data=streaming`` and its shards (LitData): the writer's round trip, no pickle, the manifest, and the reader's
guarantees — the (seed, epoch) order, each item once per epoch over DDP ranks and loader workers, mid-epoch resume
through the loader's state, and litdata's remote path (``local:``, its stand-in for an object store)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import DigitsDataModule, StreamingDataModule
from difflab.data.shards import MANIFEST, write_shards
from difflab.data.transforms import to_unit_range
from difflab.tasks.stream import stream
from tests.conftest import compose_config

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


class IndexedImages(torch.utils.data.Dataset):
    """``n`` seeded 8-bit images of ``shape`` in [-1, 1], labelled with their own index (to tell items apart)."""

    def __init__(self, n: int, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0, floats: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=generator)
        self.floats = torch.randn((n, *shape), generator=generator) if floats else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return (to_unit_range(self.images[i]) if self.floats is None else self.floats[i]), i


def write_indexed(out: Path, n_train: int = 100, n_val: int = 20, **kwargs) -> Path:
    """A shard set of :class:`IndexedImages` (train: labels 0..n_train-1; val: another seed)."""
    sets = {"train": IndexedImages(n_train, **kwargs), "val": IndexedImages(n_val, seed=1, **kwargs)}
    write_shards(sets, out, chunk_bytes=2048)  # several chunks: reads cross chunk files
    return out


def module(input_dir: Path | str, **kwargs) -> StreamingDataModule:
    return StreamingDataModule(input_dir=str(input_dir), **{"image_size": 8, "batch_size": 16, **kwargs})


def attach(dm: StreamingDataModule, rank: int = 0, world_size: int = 1, epoch: int = 0) -> SimpleNamespace:
    """A stand-in for the Trainer the loaders read: rank, world size, current epoch, device."""
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world_size, current_epoch=epoch, strategy=strategy)
    return dm.trainer


def labels(loader) -> list[list[int]]:
    return [y.tolist() for _, y in loader]


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    """``python src/stream.py data=digits out_dir=...`` (16x16, the default splits), in-process."""
    out = tmp_path_factory.mktemp("digits_shards")
    stream(compose_config(["data=digits", f"out_dir={out}"], out, config_name="stream"))
    return out


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    return write_indexed(tmp_path_factory.mktemp("indexed"))


# --- the writer -----------------------------------------------------------------------------------


def test_shards_hold_the_source_items_in_order_without_pickle(digits_shards):
    source = DigitsDataModule(image_size=16)
    source.setup()
    dm = StreamingDataModule(input_dir=str(digits_shards), image_size=16)
    dm.setup()
    for split in ("train", "val", "test"):
        ours, theirs = getattr(dm, split), getattr(source, split)
        assert len(ours) == len(theirs)
        everything = torch.arange(len(ours))
        assert all(torch.equal(a, b) for a, b in zip(ours.batch(everything), theirs.batch(everything), strict=True))
        index = json.loads((digits_shards / split / "index.json").read_text())["config"]
        assert index["data_format"] == ["tensor", "int"]  # litdata's raw tensor and int serializers, no pickle
    manifest = json.loads((digits_shards / MANIFEST).read_text())
    assert manifest["kind"] == "image" and manifest["shape"] == [1, 16, 16] and manifest["dtype"] == "uint8"
    assert dm.num_classes == 10 and dm.class_names == source.class_names
    assert manifest["source"]["_target_"] == "difflab.data.DigitsDataModule"


def test_an_image_folder_round_trips_rgb_with_flips_off_at_the_source(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(12):
            array = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / "images" / c / f"{i}.png")
    images = str(tmp_path / "images")
    overrides = ["data=image_folder", f"data.data_dir={images}", "data.image_size=8", "data.val_size=4"]
    stream(compose_config([*overrides, "data.test_size=4", f"out_dir={tmp_path / 'shards'}"], tmp_path, "stream"))
    manifest = json.loads((tmp_path / "shards" / MANIFEST).read_text())
    assert manifest["shape"] == [3, 8, 8] and manifest["class_names"] == ["cat", "dog"]
    assert manifest["source"]["random_flip"] is False  # image_folder's default is true: shards hold items unflipped
    from difflab.data import ImageFolderDataModule

    source = ImageFolderDataModule(images, image_size=8, val_size=4, test_size=4, random_flip=False, batch_size=4)
    source.setup()
    dm = module(tmp_path / "shards", channels=3)
    dm.setup()
    assert len(dm.train) == len(source.train) == 16
    for i in range(16):
        assert all(torch.equal(a, b) for a, b in zip(dm.train[i], source.train[i], strict=True))


@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("workers", [0, 1], ids=["in_process", "litdata_optimize"])
def test_fashion_mnist_round_trips(tmp_path, workers):
    """Both writers (this process; litdata.optimize's worker process, ~14 s to start) write the source's items."""
    from difflab.data import FashionMNISTDataModule

    data = ["data=fashion_mnist", "data.image_size=16", "data.limit_train_size=300", "data.val_size=50"]
    writer = [f"out_dir={tmp_path}", f"num_workers={workers}", "splits=[train]"]
    stream(compose_config([*data, *writer], tmp_path, "stream"))
    dm = module(tmp_path, image_size=16)
    dm.setup()
    source = FashionMNISTDataModule(str(tmp_path / "none"), image_size=16, limit_train_size=300, val_size=50)
    source.setup()
    assert len(dm.train) == 300 and len(dm.val) == len(dm.test) == 0  # splits=[train]
    everything = torch.arange(300)
    ours, theirs = dm.train.batch(everything), source.train.batch(everything)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert dm.class_names == source.class_names


def test_float_items_are_stored_as_they_are(tmp_path):
    """A set of float tensors (the latent cache's moments): stored as float32, read back exactly."""
    write_indexed(tmp_path, n_train=40, n_val=8, shape=(4, 8, 8), floats=True)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["kind"] == "tensor" and manifest["dtype"] == "float32"
    dm = module(tmp_path, channels=4)
    dm.setup()
    x, y = dm.train.batch(torch.tensor([5, 0, 39]))
    assert torch.equal(x, IndexedImages(40, (4, 8, 8), floats=True).floats[[5, 0, 39]]) and y.tolist() == [5, 0, 39]


def test_the_writer_refuses_to_overwrite_and_a_set_without_manifest_is_unfinished(digits_shards, tmp_path):
    cfg = compose_config(["data=digits", f"out_dir={digits_shards}"], tmp_path, config_name="stream")
    with pytest.raises(FileExistsError, match="overwrite=true"):
        stream(cfg)
    partial = write_indexed(tmp_path / "partial")
    (partial / MANIFEST).unlink()  # as after a kill before the end
    with pytest.raises(FileNotFoundError, match="did not finish"):
        module(partial).setup()
    with pytest.raises(FileExistsError, match="overwrite=true"):  # an unfinished set is not replaced silently either
        stream(compose_config(["data=digits", f"out_dir={partial}"], tmp_path, config_name="stream"))
    stream(
        compose_config(["data=digits", f"out_dir={partial}", "overwrite=true", "splits=[train]"], tmp_path, "stream")
    )
    assert sorted(p.name for p in partial.iterdir()) == [MANIFEST, "train"]  # the old val split went with the rest


def test_shards_that_would_unpickle_are_refused(tmp_path):
    """Items that litdata can only pickle are never decoded: the read fails before any payload runs."""
    from litdata.streaming.writer import BinaryWriter

    marker = tmp_path / "ran"
    write_indexed(tmp_path / "set")
    writer = BinaryWriter(str(tmp_path / "evil"), chunk_bytes=4096)
    writer[0] = {"x": Payload(str(marker)), "y": 0}
    writer.done()
    writer.merge()
    train = tmp_path / "set" / "train"
    for path in train.iterdir():
        path.unlink()
    for path in (tmp_path / "evil").iterdir():
        path.rename(train / path.name)
    manifest = json.loads((tmp_path / "set" / MANIFEST).read_text())
    manifest["splits"]["train"]["items"] = 1
    (tmp_path / "set" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'pickle' serializer"):
        module(tmp_path / "set", batch_size=1).setup()
    assert not marker.exists()


class Payload:
    """Creates a file when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_shape_other_than_the_config_is_an_error_naming_the_keys(indexed):
    with pytest.raises(ValueError, match=r"set data.channels=1 data.image_size=8"):
        module(indexed, image_size=16).setup()
    with pytest.raises(ValueError, match="data.input_dir"):
        StreamingDataModule(input_dir="")
    with pytest.raises(ValueError, match="data.on_device=true"):
        module(indexed, on_device=True)
    with pytest.raises(ValueError, match="data.max_cache_size"):
        module(indexed, max_cache_size="lots")


def test_limits_keep_the_first_items(indexed):
    dm = module(indexed, limit_train_size=40, val_size=5)
    dm.setup()
    assert (len(dm.train), len(dm.val), len(dm.test)) == (40, 5, 0)
    assert dm.train.batch(torch.arange(40))[1].tolist() == list(range(40))
    assert dm.num_classes is None and dm.class_names == ()


# --- the reader's order, shares and resume ---------------------------------------------------------


def test_order_is_a_function_of_seed_and_epoch_and_equals_the_in_memory_module(digits_shards):
    def batches(dm, epoch: int) -> list[list[int]]:
        attach(dm, epoch=epoch)
        return [torch.cat([x.flatten(), y.float()]).sum().item() for x, y in dm.train_dataloader()]

    dm, again = (StreamingDataModule(input_dir=str(digits_shards), image_size=16, batch_size=64) for _ in range(2))
    source = DigitsDataModule(image_size=16, batch_size=64, on_device=False)
    assert batches(dm, 0) == batches(again, 0) == batches(source, 0)
    assert batches(dm, 1) == batches(source, 1) != batches(dm, 0)
    other = StreamingDataModule(input_dir=str(digits_shards), image_size=16, batch_size=64, seed=1)
    assert batches(other, 0) != batches(dm, 0)


@pytest.mark.parametrize("world_size, num_workers, shuffle", [(1, 0, True), (2, 2, True), (3, 0, True), (2, 0, False)])
def test_each_item_once_per_epoch_over_ranks_and_workers(indexed, world_size, num_workers, shuffle):
    """100 items, batches of 16: rank r of world_size gets N // world_size items, drops its incomplete batch; the
    union of the ranks' items is each item at most once, and all but that documented remainder."""
    n, batch = 100, 16
    dropped_per_epoch = []
    for epoch in range(3):
        seen: list[int] = []
        for rank in range(world_size):
            dm = module(indexed, num_workers=num_workers, shuffle=shuffle)
            attach(dm, rank, world_size, epoch)
            seen += [i for b in labels(dm.train_dataloader()) for i in b]
        assert len(seen) == len(set(seen)), "an item came twice"
        expected_drop = n % world_size + world_size * ((n // world_size) % batch)
        assert len(seen) == n - expected_drop and set(seen) <= set(range(n))
        dropped_per_epoch.append(set(range(n)) - set(seen))
    if shuffle:  # other items are left out each epoch
        assert dropped_per_epoch[0] != dropped_per_epoch[1]


@pytest.mark.parametrize("num_workers, shuffle", [(0, True), (2, True), (0, False)])
def test_a_loader_resumed_from_its_state_gives_the_remaining_batches(indexed, num_workers, shuffle):
    dm = module(indexed, num_workers=num_workers, random_flip=True, shuffle=shuffle)
    attach(dm, epoch=2)
    full = [(x.clone(), y.clone()) for x, y in dm.train_dataloader()]
    loader = dm.train_dataloader()
    iterator = iter(loader)
    for _ in range(2):
        next(iterator)
    state = loader.state_dict()
    resumed_dm = module(indexed, num_workers=num_workers, random_flip=True, shuffle=shuffle)
    attach(resumed_dm, epoch=2)
    resumed = resumed_dm.train_dataloader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert (state["epoch"], state["batches"]) == (2, 2) and len(rest) == len(full) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, full[2:], strict=True))


def test_a_remote_store_is_read_through_the_cache(indexed, tmp_path):
    """``local:DIR`` is litdata's object-store path on a local folder: the manifest is downloaded, the chunks are
    copied into ``cache_dir``, the items are those of the folder."""
    local, remote = module(indexed), module(f"local:{indexed}", cache_dir=str(tmp_path / "cache"))
    for dm in (local, remote):
        attach(dm, epoch=1)
    assert labels(remote.train_dataloader()) == labels(local.train_dataloader())
    chunks = json.loads((indexed / MANIFEST).read_text())["splits"]["train"]["chunks"]
    assert chunks > 1 and len(list((tmp_path / "cache").rglob("chunk-*.bin"))) == chunks

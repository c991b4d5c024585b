"""``data=streaming``: train from shards (:mod:`difflab.data.shards`) in a local folder or an object store.

LitData stores and reads the items; the order is difflab's own. ``litdata.StreamingDataset`` is used as a map-style
set (``dataset[i]``, one chunk file per run of indices, remote chunks downloaded into ``cache_dir`` and kept there),
and training draws its order from :mod:`difflab.data.order`, as every in-memory set does:

- an epoch is one permutation seeded by (seed, epoch), whatever the number of workers, ranks' shares included; the
  same seed gives the same batches as the in-memory module the shards were written from (item i of the shards is
  item i of its train split): a streamed run equals the in-memory run bit for bit;
- DDP rank r takes every world_size-th item of that permutation (an ``EpochSampler``, a ``DistributedSampler``,
  which Lightning leaves in place under ``use_distributed_sampler``), and workers get whole batches from the main
  process: within an epoch no item comes twice. Dropped per epoch: the last ``N % world_size`` items of the
  permutation and, per rank, the ``(N // world_size) % batch_size`` items of an incomplete last batch — fewer than
  ``world_size * batch_size`` items, other ones every epoch;
- mid-epoch resume is the loader's ``state_dict`` (the epoch and how far into it training got), which Lightning
  saves in checkpoints and restores before the first batch of the resumed run.

LitData's own iteration (``StreamingDataset(shuffle=True)`` with ``StreamingDataLoader``) was not taken: its order
depends on ``num_workers`` and the batch size (chunk intervals are assigned per worker), so changing the worker
count changes the run, and its epoch advances on every ``iter()`` of the loader, which Lightning calls in places
where the epoch has not changed (the ``set_epoch`` pitfalls of :mod:`difflab.data.order`). Its sharding itself is
exactly-once (its chunk assignment, checked for 1-3 ranks x 1-2 workers: with ``drop_last`` it drops a remainder
smaller than world_size x batch_size and repeats nothing); the order is what rules it out.

The price of a global permutation: reading is random access (each chunk file memory-mapped, see
:func:`open_split`), so a remote split is downloaded whole into ``cache_dir`` during the first epoch, a chunk when
an item of it is first needed, and read from there afterwards; ``max_cache_size`` must hold the split
(manifest.json's ``bytes``), else chunks are evicted and downloaded again. (A chunk-local order, which would
stream sets larger than the local disk, is not offered.)
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from difflab.data.base import ImageDataModule, _check_bool, _check_int
from difflab.data.shards import READ_SERIALIZERS, is_remote, read_manifest, split_url
from difflab.data.transforms import BatchedDataset, random_hflip, to_unit_range

_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}
# litdata logs at INFO each time a set is opened, in every worker (its default cache size, its POSIX-fast mode):
# its warnings are kept, unless the user chose a level for litdata's loggers
if logging.getLogger("litdata").level == logging.NOTSET:
    logging.getLogger("litdata").setLevel(logging.WARNING)


class StreamedSplit(BatchedDataset):
    """One split of a shard set: items (x float32 (C, S, S), y int64), x in [-1, 1] for image shards (stored as
    uint8) or as stored for tensor shards; keys as :class:`~difflab.data.transforms.InMemoryImageDataset`'s (an
    index, or (index, flip) from the training order). The first ``length`` of the split's ``total`` items."""

    def __init__(
        self,
        url: str,
        length: int,
        total: int,
        manifest: dict[str, Any],
        random_flip: bool = False,
        cache_dir: str | None = None,
        max_cache_size: int | float | str | None = None,
        storage_options: dict | None = None,
    ) -> None:
        self.url, self.length, self.total = url, length, total
        self.image = manifest["kind"] == "image"
        self.shape = tuple(manifest["shape"])
        self.dtype = _DTYPES[manifest["dtype"]]
        self.random_flip = random_flip
        self.options = {"cache_dir": cache_dir, "max_cache_size": max_cache_size, "storage_options": storage_options}
        self._dataset: Any = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict[str, Any]:  # a worker started by spawn opens its own reader
        return {**self.__dict__, "_dataset": None, "_pid": None}

    def reader(self) -> Any:
        """This process's ``litdata.StreamingDataset`` (opened on first use; a forked worker opens its own)."""
        if self._dataset is None or self._pid != os.getpid():
            dataset = open_split(self.url, **self.options)
            total = len(dataset.cache)  # all items: len(dataset) is this DDP rank's share of litdata's own sharding
            if total != self.total:
                raise ValueError(
                    f"{self.url} holds {total} items, its manifest.json {self.total}: the shards changed after "
                    "they were written; write them again (python src/stream.py ... overwrite=true)"
                )
            self._dataset, self._pid = dataset, os.getpid()
        return self._dataset

    def batch(self, indices: torch.Tensor, flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` (B,) stacked, read in index order (a chunk file at a time); with ``random_flip``,
        flipped where ``flips`` says (at random without it), as the in-memory sets do."""
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= self.length):
            raise IndexError(f"index out of range for the {self.length} items of {self.url}")
        reader = self.reader()
        x = torch.empty((len(indices), *self.shape), dtype=self.dtype)
        y = torch.empty(len(indices), dtype=torch.int64)
        with warnings.catch_warnings():  # litdata's tensors are views of the read-only chunk map: copied at once
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            for j in torch.argsort(indices, stable=True).tolist():
                item = reader[int(indices[j])]
                x[j] = item["x"].reshape(self.shape)
                y[j] = item["y"]
        x = to_unit_range(x) if self.image else x.to(torch.float32)
        if self.random_flip:
            x = random_hflip(x, flips)
        return x, y


def open_split(url: str, **options: Any) -> Any:
    """A ``litdata.StreamingDataset`` for reading items by index: decoded one at a time (no window of neighbours,
    which random access would throw away), remote chunks downloaded whole into the cache (not a ranged GET per
    item), and every chunk memory-mapped. The last two reach into litdata's reader: without the map, litdata
    0.2.76 reads a cached chunk *whole* for every item (25 ms an item for a 58 MB chunk instead of 10 µs); mapping
    a cached chunk is safe, as litdata removes chunk files (only when its cache is over budget) by unlinking them,
    which leaves a mapping valid."""
    from litdata import StreamingDataset
    from litdata.utilities.env import _WorkerEnv

    options = {k: v for k, v in options.items() if v is not None}
    dataset = StreamingDataset(url, serializers=READ_SERIALIZERS, batch_decode=0, **options)
    dataset._on_demand_bytes = False
    dataset.worker_env = _WorkerEnv.detect()
    dataset.cache = dataset._create_cache(worker_env=dataset.worker_env)  # what dataset[i] does on first use
    dataset.cache._reader.enable_mmap_for_chunks(set(range(len(dataset.cache.get_chunk_intervals()))))
    return dataset


def _check_input_dir(value: object) -> str:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError(f"data.input_dir={value!r}: expected a shard folder or a URI (s3://bucket/path, gs://...)")
    return str(value) if is_remote(str(value)) else str(Path(value).expanduser())


def _check_cache_size(value: object) -> int | float | str | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    if isinstance(value, float) and 0 < value <= 1:  # a fraction of the free disk
        return value
    if isinstance(value, str) and value.strip()[:1].isdigit():
        return value
    raise ValueError(
        f"data.max_cache_size={value!r}: expected null, a byte count, a size such as 100GB or a fraction of the "
        "free disk such as 0.5"
    )


class StreamingDataModule(ImageDataModule):
    """Shards of ``python src/stream.py`` at ``input_dir`` (a folder, ``s3://`` or ``gs://``): batches
    (x (B, C, S, S) float32, y (B,) int64) as the module they were written from gives them.

    ``image_size`` and ``channels`` must equal the shards' (their manifest: an error at ``setup`` otherwise; they
    stay keys because the model reads them from the config). ``val_size`` keeps the first N items of the val split
    (null: all of it), ``limit_train_size`` the first N of train. ``shuffle=false`` reads in file order. Remote
    chunks go to ``cache_dir`` (kept; ``max_cache_size`` caps it, litdata's default is 75% of the free disk);
    ``storage_options`` go to litdata's S3/GCS clients (an endpoint, a profile: no secrets, they are stored with
    the run's config; credentials come from the environment as for the cloud's own tools). ``on_device``: false
    or auto (off: items are read batch by batch; true is refused).
    """

    in_memory = False

    def __init__(
        self,
        data_dir: str = ".",
        input_dir: str | None = None,
        cache_dir: str | None = None,
        max_cache_size: int | float | str | None = None,
        storage_options: dict | None = None,
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool | str = "auto",
        persistent_workers: bool = False,
        val_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        random_flip: bool = False,
        limit_train_size: int | None = None,
        on_device: bool | str = "auto",
    ) -> None:
        super().__init__(
            data_dir, image_size, 1, batch_size, num_workers, pin_memory, persistent_workers, 0, seed, random_flip,
            limit_train_size, on_device,
        )  # fmt: skip
        self.channels = _check_int("channels", channels, 1)  # tensor shards (latents) may have any count
        self.input_dir = _check_input_dir(self.data_dir / "streaming" if input_dir is None else input_dir)
        self.cache_dir = None if cache_dir is None else str(Path(cache_dir).expanduser())
        self.max_cache_size = _check_cache_size(max_cache_size)
        if isinstance(storage_options, DictConfig):
            storage_options = OmegaConf.to_container(storage_options, resolve=True)
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ValueError(f"data.storage_options={storage_options!r}: expected a mapping (or null)")
        self.storage_options = dict(storage_options or {})
        self.shuffle = _check_bool("shuffle", shuffle)
        self.val_size = None if val_size is None else _check_int("val_size", val_size, 0)
        self._manifest: dict[str, Any] | None = None
        self.class_names: tuple[str, ...] = ()

    @property
    def manifest(self) -> dict[str, Any]:
        """The shards' manifest.json (read once, on first use: building the module reads nothing)."""
        if self._manifest is None:
            self._manifest = read_manifest(self.input_dir, self.storage_options)
            self.class_names = tuple(self._manifest.get("class_names") or ())
        return self._manifest

    @property
    def num_classes(self) -> int | None:
        """The class count of the set the shards were written from (None: unlabelled)."""
        return self.manifest.get("num_classes")

    def _check_shape(self) -> None:
        stored = tuple(self.manifest["shape"])
        if stored != self.image_shape:
            fix = f"data.channels={stored[0]} data.image_size={stored[-1]}" if len(stored) == 3 else "another set"
            raise ValueError(
                f"data.channels={self.channels} data.image_size={self.image_size} (items {self.image_shape}), but "
                f"the shards at {self.input_dir} hold items of shape {stored}: set {fix}"
            )

    def _build_splits(self) -> tuple[StreamedSplit, StreamedSplit, StreamedSplit]:
        self._check_shape()
        train = self._split("train", self.limit_train_size, self.random_flip)
        train.reader()  # an unreadable split fails here, before training starts
        return train, self._split("val", self.val_size), self._split("test", None)

    def _split(self, name: str, limit: int | None, flip: bool = False) -> StreamedSplit:
        total = int(self.manifest["splits"].get(name, {}).get("items", 0))
        length = total if limit is None else min(limit, total)
        options = {"cache_dir": self.cache_dir, "max_cache_size": self.max_cache_size}
        storage = self.storage_options or None
        url = split_url(self.input_dir, name)
        return StreamedSplit(url, length, total, self.manifest, flip, **options, storage_options=storage)

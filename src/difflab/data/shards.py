"""Shards of a difflab data set for streaming: written by LitData (``litdata.optimize``, or its ``BinaryWriter`` in
this process), read by ``litdata.StreamingDataset``.

Layout of a shard set (``python src/stream.py data=... out_dir=DIR``)::

    DIR/train/index.json, DIR/train/chunk-*.bin    one litdata dataset per split (val/, test/ likewise)
    DIR/manifest.json                              written last, atomically: no manifest = an unfinished write

An item is ``{"x": tensor, "y": int}``: x uint8 (C, S, S) for image sets (the data module's [-1, 1] floats,
mapped back to the 8-bit values they came from, checked exactly), or the item's own float tensor for other sets
(the latent cache's posterior moments); y the class label. litdata stores them with its ``tensor`` (dtype, shape
header, raw bytes) and ``int`` (8 bytes) serializers and the item's structure as JSON in ``index.json``: nothing
is pickled. Reading refuses every other serializer (:data:`READ_SERIALIZERS`): a shard set that names ``pickle``
(or another format difflab never writes) is an error before any item is decoded, not code run from a file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from litdata.streaming.serializers import _SERIALIZERS, Serializer

from difflab.data.transforms import to_unit_range
from difflab.utils.paths import atomic_write

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "difflab-shards"
VERSION = 1
SPLITS = ("train", "val", "test")
STORES = ("auto", "uint8", "float")
# the litdata serializers our items use (a 1-D x goes to no_header_tensor)
WRITTEN_FORMATS = frozenset({"tensor", "no_header_tensor", "int"})
_BLOCK = 1024  # items per optimize input: one call of the writer function yields a block


def is_remote(url: str) -> bool:
    """Whether ``url`` is an object-store URI litdata downloads from (``s3://``, ``gs://``, ..., and ``local:``,
    litdata's stand-in for a remote store on a local path) rather than a local folder."""
    return "://" in url or url.startswith("local:")


def split_url(input_dir: str, split: str) -> str:
    return f"{input_dir.rstrip('/')}/{split}"


class RefusedSerializer(Serializer):
    """Stands in for every litdata serializer difflab never writes: opening a shard set whose items use one
    (``pickle`` would run code stored in the file) is an error naming it."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _refuse(self) -> None:
        raise ValueError(
            f"the shards store items with litdata's {self.name!r} serializer: difflab writes only "
            f"{sorted(WRITTEN_FORMATS)} and refuses to decode anything else (write them with src/stream.py)"
        )

    def setup(self, metadata: Any) -> None:
        self._refuse()

    def serialize(self, data: Any) -> tuple[bytes, str | None]:
        self._refuse()

    def deserialize(self, data: bytes) -> Any:
        self._refuse()

    def can_serialize(self, data: Any) -> bool:
        return False


READ_SERIALIZERS: dict[str, Serializer] = {
    name: RefusedSerializer(name) for name in _SERIALIZERS if name not in WRITTEN_FORMATS
}


# --- the manifest -------------------------------------------------------------------------------


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """``out_dir/manifest.json``, whole or not at all."""
    path = Path(out_dir) / MANIFEST
    with atomic_write(path) as file:
        file.write(json.dumps({"format": FORMAT, "version": VERSION, **manifest}, indent=2).encode())
    return path


def read_manifest(input_dir: str, storage_options: dict | None = None) -> dict:
    """The manifest of the shard set at ``input_dir`` (a folder, or a URI fetched with litdata's downloaders),
    checked; a missing one is an error saying what it means."""
    where = f"data.input_dir={input_dir!r}"
    try:
        text = _read_text(input_dir, MANIFEST, storage_options)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{where}: no {MANIFEST} there. It is written last by `python src/stream.py data=... out_dir=DIR`: "
            "without it the shards are not a difflab shard set, or their write did not finish (run it again)"
        ) from err
    except Exception as err:  # a remote store's client: credentials, network, bucket
        raise OSError(f"{where}: could not fetch {MANIFEST} ({type(err).__name__}: {err})") from err
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: {MANIFEST} is not JSON ({err})") from err
    return check_manifest(manifest, where)


def _read_text(input_dir: str, name: str, storage_options: dict | None) -> str:
    """The text of ``input_dir/name``: read in place, or downloaded into a temporary folder (never a stale copy)."""
    if not is_remote(input_dir):
        return (Path(input_dir).expanduser() / name).read_text()
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, name)
        downloader = get_downloader(input_dir, tmp, [], storage_options or {})
        downloader.download_file(f"{input_dir.rstrip('/')}/{name}", local)
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{input_dir}/{name}")
        return Path(local).read_text()


def check_manifest(manifest: Any, where: str) -> dict:
    """The manifest, after checking the keys the reader relies on."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: {MANIFEST} is not a difflab shard manifest (format {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{where}: {MANIFEST} version {manifest.get('version')!r}; this difflab reads {VERSION}")
    shape, splits = manifest.get("shape"), manifest.get("splits")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ValueError(f"{where}: {MANIFEST} has no valid item shape ({shape!r})")
    if manifest.get("kind") not in ("image", "tensor") or not isinstance(splits, dict) or "train" not in splits:
        raise ValueError(f"{where}: {MANIFEST} lacks its kind or its train split")
    if manifest.get("dtype") not in ("uint8", "float32"):
        raise ValueError(f"{where}: {MANIFEST} has dtype {manifest.get('dtype')!r}, expected uint8 or float32")
    for split, entry in splits.items():
        if split not in SPLITS or not isinstance(entry, dict) or not isinstance(entry.get("items"), int):
            raise ValueError(f"{where}: {MANIFEST} has an invalid split entry {split!r}: {entry!r}")
    return manifest


# --- writing ------------------------------------------------------------------------------------


def resolve_store(dataset: Any, store: str) -> str:
    """``uint8`` or ``float`` for ``store``; ``auto``: uint8 when the first item is an 8-bit image mapped to [-1, 1]
    (what every image data module yields), else float (latents)."""
    if store not in STORES:
        raise ValueError(f"store={store!r}: expected one of {', '.join(STORES)}")
    if store != "auto":
        return store
    x = torch.as_tensor(dataset[0][0])
    return "uint8" if x.is_floating_point() and _as_uint8(x) is not None else "float"


def _as_uint8(x: torch.Tensor) -> torch.Tensor | None:
    """The uint8 image whose [-1, 1] version is exactly ``x``, or None."""
    u = x.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    return u if torch.equal(to_unit_range(u), x.float()) else None


class ItemWriter:
    """The ``fn`` of ``litdata.optimize``: the items of one block of ``dataset`` as ``{"x", "y"}`` dicts."""

    def __init__(self, dataset: Any, store: str, shape: tuple[int, ...]) -> None:
        self.dataset, self.store, self.shape = dataset, store, shape

    def __call__(self, start: int) -> Iterator[dict[str, Any]]:
        keys = list(range(start, min(start + _BLOCK, len(self.dataset))))
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(keys) if getitems else [self.dataset[i] for i in keys]
        for index, (x, y) in zip(keys, items, strict=True):
            yield {"x": self._x(index, torch.as_tensor(x)), "y": int(y)}

    def _x(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.shape:
            raise ValueError(f"item {index} has shape {tuple(x.shape)}, item 0 {self.shape}: shards need one shape")
        if self.store == "float":
            return x.detach().to(torch.float32).contiguous().clone()
        u = _as_uint8(x)
        if u is None:
            raise ValueError(f"item {index} is not an 8-bit image scaled to [-1, 1]: write it with store=float")
        return u.contiguous()


def write_shards(
    datasets: dict[str, Any],
    out_dir: str | Path,
    *,
    store: str = "auto",
    chunk_bytes: str | int = "64MB",
    num_workers: int = 0,
    num_classes: int | None = None,
    class_names: tuple[str, ...] | list[str] = (),
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A shard set in ``out_dir`` from map-style ``datasets`` ({"train": ..., "val": ...}, items (x tensor,
    label); the latent cache's as well as the image sets'): each split with :func:`write_split`, then the
    manifest (``source``: the config they came from). Returns the manifest."""
    import litdata

    if "train" not in datasets or not set(datasets) <= set(SPLITS):
        raise ValueError(f"splits {sorted(datasets)}: expected train and any of val, test")
    (Path(out_dir) / MANIFEST).unlink(missing_ok=True)  # from here on the set is unfinished until the end
    written: dict[str, dict[str, Any]] = {}
    for split, dataset in datasets.items():
        start = time.perf_counter()
        written[split] = entry = write_split(dataset, Path(out_dir) / split, store, chunk_bytes, num_workers)
        log.info(
            "%s: %d items, %d chunk(s), %.1f MB, in %.1f s",
            split, entry["items"], entry["chunks"], entry["bytes"] / 1e6, time.perf_counter() - start,
        )  # fmt: skip
    first = written["train"]
    if any((e["shape"], e["store"]) != (first["shape"], first["store"]) for e in written.values()):
        raise ValueError(f"the splits differ in item shape or store: { {s: e['shape'] for s, e in written.items()} }")
    manifest = {
        "kind": "image" if first["store"] == "uint8" else "tensor",
        "shape": first["shape"],
        "dtype": first["dtype"],
        "num_classes": num_classes,
        "class_names": [str(n) for n in class_names],
        "splits": {s: {k: e[k] for k in ("items", "bytes", "chunks")} for s, e in written.items()},
        "chunk_bytes": chunk_bytes,
        "source": source or {},
        "writer": {"litdata": litdata.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    write_manifest(out_dir, manifest)
    return manifest


def write_split(
    dataset: Any, out_dir: str | Path, store: str, chunk_bytes: str | int, num_workers: int = 0
) -> dict[str, Any]:
    """All items of ``dataset`` (map-style, items (x tensor, label)) in order into ``out_dir``: with
    ``num_workers`` ≥ 1 by ``litdata.optimize`` in that many processes (each a contiguous part, in order), with 0
    by litdata's ``BinaryWriter`` in this process (what optimize's workers run: the same files, without the
    processes' start-up, ~14 s on 2 cores). Returns the split's manifest entry (items, bytes, chunks, store,
    shape, dtype)."""
    if getattr(dataset, "random_flip", False):
        raise ValueError("the source set flips at random: write it with data.random_flip=false (flip when reading)")
    if len(dataset) == 0:
        raise ValueError("the split is empty: nothing to write")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    store = resolve_store(dataset, store)
    shape = tuple(torch.as_tensor(dataset[0][0]).shape)
    fn, blocks = ItemWriter(dataset, store, shape), list(range(0, len(dataset), _BLOCK))
    if num_workers == 0:
        _write_here(fn, blocks, out_dir, chunk_bytes)
    else:
        _optimize(fn, blocks, out_dir, chunk_bytes, num_workers)
    entry = _split_entry(out_dir, store, shape)
    if entry["items"] != len(dataset):
        raise ValueError(f"{out_dir}: litdata wrote {entry['items']} items of {len(dataset)}")
    return entry


def _optimize(fn: ItemWriter, blocks: list[int], out_dir: Path, chunk_bytes: str | int, num_workers: int) -> None:
    import multiprocessing

    import litdata

    method = multiprocessing.get_start_method(allow_none=True)
    try:
        litdata.optimize(
            fn=fn,
            inputs=blocks,
            output_dir=str(out_dir),
            chunk_bytes=chunk_bytes,
            num_workers=num_workers,
            keep_data_ordered=True,  # each worker a contiguous slice, in order: item i of the shards is item i here
            reorder_files=False,
            mode="overwrite",
            verbose=False,
        )
    finally:  # optimize sets the process-wide start method to spawn: later DataLoader workers would re-import all
        multiprocessing.set_start_method(method, force=True)


def _write_here(fn: ItemWriter, blocks: list[int], out_dir: Path, chunk_bytes: str | int) -> None:
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(out_dir), chunk_bytes=chunk_bytes)
    index = 0
    for start in blocks:
        for item in fn(start):
            writer[index] = item
            index += 1
    writer.done()
    writer.merge()


def _split_entry(out_dir: Path, store: str, shape: tuple[int, ...]) -> dict[str, Any]:
    index = json.loads((out_dir / "index.json").read_text())
    formats = set(index["config"]["data_format"])
    if not formats <= WRITTEN_FORMATS:  # litdata fell back to another serializer (pickle): never leave such shards
        raise ValueError(f"litdata stored the items as {sorted(formats)}, expected {sorted(WRITTEN_FORMATS)}")
    chunks = index["chunks"]
    return {
        "items": sum(int(c["chunk_size"]) for c in chunks),
        "bytes": sum(int(c["chunk_bytes"]) for c in chunks),
        "chunks": len(chunks),
        "store": store,
        "shape": list(shape),
        "dtype": "uint8" if store == "uint8" else "float32",
    }

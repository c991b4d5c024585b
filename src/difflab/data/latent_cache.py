"""The on-disk latent cache: a data set encoded once by a frozen stage-1 autoencoder (``python src/encode.py``).

A cache is one directory::

    manifest.json            what it is: format version, the autoencoder's identity (SHA-256 of its weights), the
                             data's identity (its config and a hash of the encoded images), shapes, counts, classes
    train-00000.safetensors  shards of ``shard_size`` items: ``moments`` (n, C', h, w) float32, ``labels`` (n,) int64
    ...                      and, for a training set with random flips, ``moments_flip`` (the mirrored images')
    val-00000.safetensors, test-00000.safetensors

``moments`` is what :meth:`Autoencoder.encode_moments` gives, bit for bit: for ``kl`` the posterior mean μ and the
log-variance log σ² on the channel axis (2·embed_dim channels), so training still draws z ~ q(z|x) = N(μ, σ²) afresh
at every step (σ = exp(½ log σ²), the :class:`DiagonalGaussian` that on-the-fly encoding uses); for ``vq`` the
pre-quantisation z_e (the decoder quantises). Shards are safetensors files (written by the ``safetensors`` package,
memory-mapped by :class:`SafetensorsFile`); nothing is unpickled. The directory is written under a temporary name
and renamed into place when complete, so a killed encode never leaves a directory that looks like a cache;
:func:`read_manifest` also checks every shard's size.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch.utils.data import Dataset

from difflab.data.transforms import BatchedDataset
from difflab.utils.hashing import json_sha256
from difflab.utils.paths import atomic_write

FORMAT = "difflab-latent-cache"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
ENCODE_COMMAND = "python src/encode.py autoencoder_ckpt=<stage-1 ckpt | shipped:NAME> data=<image data> out_dir={dir}"
# data keys that change how batches are loaded, never which images are encoded: not part of the data's identity
# (data_dir neither: the encoded images' own hash is recorded, so a set found in another folder is the same set)
LOADER_KEYS = frozenset(
    {"batch_size", "num_workers", "pin_memory", "persistent_workers", "on_device", "download", "data_dir"}
)

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8"}
_NUMPY = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8}


# --------------------------------------------------------------------------------------------------- identities


def data_identity(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the images of an image data config (a resolved ``data`` mapping): its ``_target_`` and every
    key but the loader ones (:data:`LOADER_KEYS`), with their SHA-256 (``sha256``)."""
    config = {k: v for k, v in data_cfg.items() if k not in LOADER_KEYS and k != "_target_"}
    identity = {"_target_": data_cfg.get("_target_"), "config": config}
    return {**identity, "sha256": json_sha256(identity)}


def identity_differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """``key: recorded → wanted`` for each data-identity entry that differs (``_target_`` and config keys)."""
    rows = [("_target_", recorded.get("_target_"), wanted.get("_target_"))]
    old, new = recorded.get("config", {}), wanted.get("config", {})
    rows += [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))]
    return [f"{key}: {a!r} → {b!r}" for key, a, b in rows if a != b]


# ---------------------------------------------------------------------------------------------- safetensors I/O
def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict:
    """Write ``tensors`` as a safetensors file (the ``safetensors`` package) through :func:`atomic_write`; returns the
    file's ``bytes`` and ``sha256``."""
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} is not one the latent cache stores")
    blob = safetensors.torch.save({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, dict(metadata))
    with atomic_write(path) as file:
        file.write(blob)
    return {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


class SafetensorsFile:
    """A safetensors file read lazily: its header at construction (checked against the file's size), each tensor
    as a read-only ``np.memmap`` on first use (the OS page cache shares it between DDP ranks and workers).

    Why not ``safetensors.safe_open``: it reads contiguous slices, while a training batch gathers scattered rows of a
    shard (the epoch's permutation); here a batch is one fancy index into the memory map, nothing copied beyond the
    rows, and the file format is the package's (the tests read our files with it and its files with this)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        size = self.path.stat().st_size
        with self.path.open("rb") as file:
            head = file.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < length <= size - 8:
                raise ValueError(f"{self.path}: not a safetensors file (header length {length}, file {size} bytes)")
            header = json.loads(file.read(length))
        self.metadata: dict[str, str] = header.pop("__metadata__", {}) or {}
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + length
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end != size:
            raise ValueError(f"{self.path}: {size} bytes, the header describes {self.data_start + end} (truncated?)")
        self._arrays: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a read-only memory-mapped array (a ``KeyError`` naming the file when absent)."""
        if name not in self._arrays:
            if name not in self.entries:
                raise KeyError(f"{self.path} has no tensor {name!r} (it has {sorted(self.entries)})")
            entry = self.entries[name]
            begin, end = entry["data_offsets"]
            dtype, shape = np.dtype(_NUMPY[entry["dtype"]]), tuple(entry["shape"])
            if end - begin != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"{self.path}: tensor {name!r} of shape {shape} does not fill its {end - begin} bytes")
            self._arrays[name] = np.memmap(self.path, dtype, "r", self.data_start + begin, shape)
        return self._arrays[name]

    def tensor(self, name: str) -> torch.Tensor:
        """A copy of the tensor ``name`` in memory."""
        return torch.from_numpy(np.array(self.array(name)))


# ------------------------------------------------------------------------------------------------------ manifest
def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def read_manifest(cache_dir: str | Path, key: str = "data.cache_dir") -> dict[str, Any]:
    """The manifest of the complete cache in ``cache_dir``, after checking its format and that every shard is there
    with its recorded size; otherwise an error naming ``key`` and the encode command."""
    root = Path(cache_dir)
    command = ENCODE_COMMAND.format(dir=root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{key}={str(root)!r}: no latent cache there (no such directory). Encode one: {command}"
        )
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}={str(root)!r} has no {MANIFEST}: not a complete latent cache (an encode stopped before its end "
            f"leaves only a .{root.name}.partial-* folder beside it). Encode it again: {command}"
        )
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{key}={str(root)!r}: {path} is not valid JSON ({err}). Encode it again: {command}") from err
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{key}={str(root)!r}: {MANIFEST} is format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}, this difflab reads {FORMAT!r} version {VERSION}. Encode it again: {command}"
        )
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            file = root / shard["file"]
            size = file.stat().st_size if file.is_file() else None
            if size != shard["bytes"]:
                state = "missing" if size is None else f"{size} bytes, the manifest says {shard['bytes']}"
                raise ValueError(
                    f"{key}={str(root)!r}: {split} shard {file.name} is {state}. Encode it again: {command}"
                )
    return manifest


def moments_shape(manifest: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(int(s) for s in manifest["moments"]["shape"])


# ------------------------------------------------------------------------------------------------------ dataset
class LatentDataset(BatchedDataset):
    """One split of a cache: items (moments (C', h, w) float32, y int64) read from memory-mapped shards.

    ``limit``: only the first ``limit`` items (all when None or more). ``random_flip``: training items keyed
    (index, flip) by :class:`~difflab.data.order.EpochSampler` take the mirrored image's moments where flip is true
    (a plain index draws the flip at random, as :class:`InMemoryImageDataset` does). ``source``: a function that
    returns the image dataset the split was encoded from (what FID's real statistics read; built on first use).
    """

    def __init__(
        self,
        root: Path,
        entry: Mapping[str, Any],
        shape: Iterable[int],
        limit: int | None = None,
        random_flip: bool = False,
        source: Callable[[], Dataset] | None = None,
    ) -> None:
        self.files = [Path(root) / shard["file"] for shard in entry["shards"]]
        counts = np.array([int(shard["count"]) for shard in entry["shards"]], dtype=np.int64)
        self.ends = np.cumsum(counts)
        self.starts = self.ends - counts
        total = int(self.ends[-1]) if len(counts) else 0
        self.length = total if limit is None else min(total, int(limit))
        self.shape, self.random_flip = tuple(int(s) for s in shape), bool(random_flip)
        self._source_factory, self._source = source, None
        self._shards: dict[int, SafetensorsFile] = {}
        labels = [self._shard(i).tensor("labels") for i in range(len(self.files))]
        self.labels = torch.cat(labels)[: self.length] if labels else torch.zeros(0, dtype=torch.int64)

    def _shard(self, index: int) -> SafetensorsFile:
        if index not in self._shards:
            self._shards[index] = SafetensorsFile(self.files[index])
        return self._shards[index]

    def __getstate__(self) -> dict[str, Any]:
        """For worker processes started by spawn: they map the shards themselves and never need the images."""
        return {**self.__dict__, "_shards": {}, "_source": None, "_source_factory": None}

    def __len__(self) -> int:
        return self.length

    def batch(self, indices: torch.Tensor, flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``indices`` (B,) stacked: moments (B, C', h, w) float32 and labels (B,)."""
        idx = indices.numpy()
        if len(idx) and (idx.min() < 0 or idx.max() >= self.length):
            raise IndexError(f"latent cache index out of range [0, {self.length}): {idx.min()}..{idx.max()}")
        if self.random_flip and flips is None:
            flips = torch.rand(len(idx)) < 0.5
        flipped = flips.numpy() if self.random_flip else np.zeros(len(idx), dtype=bool)
        shard = np.searchsorted(self.ends, idx, side="right")
        local = idx - self.starts[shard]
        out = np.empty((len(idx), *self.shape), dtype=np.float32)
        for s in np.unique(shard):
            for flip in (False, True):
                rows = (shard == s) & (flipped == flip)
                if rows.any():
                    out[rows] = self._shard(int(s)).array("moments_flip" if flip else "moments")[local[rows]]
        return torch.from_numpy(out), self.labels[indices]

    @property
    def source(self) -> Dataset:
        """The image dataset this split was encoded from (rebuilt from the manifest's data config on first use)."""
        if self._source is None:
            if self._source_factory is None:
                raise ValueError("this latent split records no image data to rebuild its images from")
            self._source = self._source_factory()
        return self._source

"""Sharded checkpoints: each process writes its own pieces of the model, EMA and optimizer state; any number of
processes reads them back (resharded), and one process can consolidate them into an ordinary checkpoint.

Layout of a sharded checkpoint ``NAME`` (e.g. ``last.ckpt``), written by ``trainer=fsdp``::

    NAME -> .NAME.<id>/                     a relative symbolic link to the newest complete copy
    .NAME.<id>/index.json                   format, world size, and for every sharded tensor its path in the
                                            checkpoint, global shape, dtype and pieces (file, key, offset, shape)
    .NAME.<id>/meta.pt                      everything else (loops, callbacks, config, replicated tensors): a
                                            ``torch.save`` of tensors and plain containers, opened weights-only
    .NAME.<id>/shards/rank-00003.safetensors   the pieces process 3 holds (safetensors: data, never code)

Why not ``torch.distributed.checkpoint`` (DCP, what Lightning's ModelParallelStrategy writes): DCP's ``.metadata``
is a pickle and its non-tensor entries are pickled bytes, and opening a file must never run code here
(:mod:`difflab.utils.checkpoint_io`); its directory is also written in place, so a kill mid-write leaves a
half-written checkpoint under the final name. Here every write goes to a fresh hidden directory, and only when all
processes have finished (and the files are flushed) does a rename switch the link ``NAME`` over to it: a kill at any
moment leaves either the previous checkpoint or the new one, never a mix. Reading takes any box of a tensor from the
pieces that overlap it, so a checkpoint written by 2 processes resumes on 1, 3 or 8, and
:meth:`ShardedCheckpointReader.consolidated` gives the whole checkpoint as ``torch.load`` of an unsharded one would.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

FORMAT = "difflab-sharded-checkpoint/1"
INDEX, META, SHARDS = "index.json", "meta.pt", "shards"
SHARDED = "<sharded: see index.json>"  # what meta.pt holds where a sharded tensor was

TreePath = tuple[str | int, ...]


def _is_sharded_leaf(leaf: Any) -> bool:
    return isinstance(leaf, str) and leaf == SHARDED


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` (or what its link points to) is a sharded checkpoint directory."""
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


def _leaves(tree: Any, path: TreePath = ()) -> Iterator[tuple[TreePath, Any]]:
    """(path, value) of every leaf of nested dicts/lists/tuples, in a fixed order (dicts in insertion order)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, (*path, key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _leaves(value, (*path, i))
    else:
        yield path, tree


def _replace(tree: Any, fn: Callable[[TreePath, Any], Any], path: TreePath = ()) -> Any:
    """``tree`` with every leaf replaced by ``fn(path, leaf)``."""
    if isinstance(tree, dict):
        return {key: _replace(value, fn, (*path, key)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_replace(value, fn, (*path, i)) for i, value in enumerate(tree))
    return fn(path, tree)


def shard_box(tensor: DTensor) -> tuple[list[int], list[int]]:
    """(offset, shape) of this process's piece of ``tensor`` in the global tensor."""
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return list(offset), list(shape)


def as_shard(local: torch.Tensor, like: DTensor) -> DTensor:
    """``local`` (this process's box of a global tensor, :func:`shard_box`) as a DTensor sharded as ``like``, on its
    device and in its dtype."""
    local = local.to(device=like.device, dtype=like.dtype).contiguous()
    return DTensor.from_local(
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def _writes_piece(tensor: DTensor) -> bool:
    """Whether this process stores its piece: a replicated mesh dimension is written by its first coordinate only,
    so replicas are stored once; an empty piece (an uneven split) is not stored."""
    coordinate = tensor.device_mesh.get_coordinate() or []
    replicated = [d for d, p in enumerate(tensor.placements) if isinstance(p, Replicate)]
    return all(coordinate[d] == 0 for d in replicated) and tensor.to_local().numel() > 0


def _all_gather(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_tree(directory: Path) -> None:
    for path in [*directory.rglob("*"), directory]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_sharded_checkpoint(checkpoint: dict[str, Any], path: str | Path, rank: int, world_size: int) -> Path:
    """Write ``checkpoint`` (whose ``DTensor`` leaves are sharded; every process calls this with its own) as a
    sharded checkpoint at ``path``; returns the directory the link ``path`` points to.

    Collective: every process must call it with the same ``path`` (rank 0's is used) and a checkpoint of the same
    structure. Atomic (see the module docstring).
    """
    path = Path(path)
    target_name = _all_gather(f".{path.name}.{uuid.uuid4().hex[:8]}", world_size)[0]
    target = path.parent / target_name
    if rank == 0:
        (target / SHARDS).mkdir(parents=True)
    _barrier(world_size)
    try:
        _write_pieces(checkpoint, target, rank, world_size)
    except BaseException:  # a failed write (a full disk) leaves no partial copy; the link still names the old one
        shutil.rmtree(target, ignore_errors=True)
        raise
    if rank == 0:
        _fsync_tree(target)
        _switch_link(path, target)
    _barrier(world_size)
    return target


def _write_pieces(checkpoint: dict[str, Any], target: Path, rank: int, world_size: int) -> None:
    """This process's shard file; rank 0 also writes meta.pt and index.json (collective)."""
    sharded = [(p, t) for p, t in _leaves(checkpoint) if isinstance(t, DTensor)]
    pieces, tensors = [], {}
    for i, (_, tensor) in enumerate(sharded):
        if _writes_piece(tensor):
            tensors[f"t{i}"] = tensor.to_local().detach().contiguous().cpu()
            pieces.append((i, *shard_box(tensor)))
    shard_file = f"{SHARDS}/rank-{rank:05d}.safetensors"
    save_file(tensors, str(target / shard_file), metadata={"format": FORMAT})
    everyone = _all_gather((shard_file, pieces), world_size)
    if rank == 0:
        entries = [
            {"path": list(p), "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "pieces": []}
            for p, t in sharded
        ]
        for file, file_pieces in everyone:
            for i, offset, shape in file_pieces:
                entries[i]["pieces"].append({"file": file, "key": f"t{i}", "offset": offset, "shape": shape})
        meta = _replace(checkpoint, lambda _, leaf: SHARDED if isinstance(leaf, DTensor) else leaf)
        torch.save(meta, target / META)
        index = {"format": FORMAT, "world_size": world_size, "tensors": entries}
        (target / INDEX).write_text(json.dumps(index, indent=1))
    _barrier(world_size)  # every shard file is closed


def _switch_link(path: Path, target: Path) -> None:
    """Point ``path`` at ``target`` in one rename, then remove what it pointed to before (one of ours)."""
    previous = path.parent / os.readlink(path) if path.is_symlink() else None
    if path.exists() and not path.is_symlink():  # a file or directory of another writer: replaced, not atomically
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    link = path.parent / f".{path.name}.link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(target.name)
    os.replace(link, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if previous is not None and previous.name.startswith(f".{path.name}.") and previous != target:
        shutil.rmtree(previous, ignore_errors=True)


def remove_sharded_checkpoint(path: str | Path) -> None:
    """Remove the link ``path`` and the directory it points to."""
    path = Path(path)
    if path.is_symlink():
        target = path.parent / os.readlink(path)
        path.unlink()
        shutil.rmtree(target, ignore_errors=True)
    elif path.is_dir():
        shutil.rmtree(path)


class ShardedCheckpointReader:
    """Reads a sharded checkpoint: its meta (weights-only), and any box of any sharded tensor.

    ``load_meta`` opens ``meta.pt`` (:func:`difflab.utils.checkpoint_io.load_checkpoint`, passed in so that this
    module stays below it). Errors name the checkpoint and what is wrong with it.
    """

    def __init__(self, path: str | Path, load_meta: Callable[[Path], dict[str, Any]], key: str = "ckpt") -> None:
        self.path, self.where = Path(path), f"{key}={str(path)!r}"
        try:
            index = json.loads((self.path / INDEX).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.where}: not a readable sharded checkpoint ({err})") from err
        if index.get("format") != FORMAT:
            raise ValueError(f"{self.where}: {INDEX} says format {index.get('format')!r}, expected {FORMAT!r}")
        self.world_size = int(index["world_size"])
        self.entries = {tuple(entry["path"]): entry for entry in index["tensors"]}
        self.meta = load_meta(self.path / META)
        self._files: dict[str, Any] = {}

    def _slice(self, piece: dict[str, Any]) -> Any:
        file = piece["file"]
        if file not in self._files:
            location = self.path / file
            if not location.is_file():
                raise ValueError(f"{self.where}: missing shard file {file} (listed in {INDEX})")
            self._files[file] = safe_open(str(location), framework="pt")
        return self._files[file].get_slice(piece["key"])

    def read(self, path: TreePath, offset: list[int] | None = None, shape: list[int] | None = None) -> torch.Tensor:
        """The box [offset, offset + shape) of the sharded tensor at ``path`` (default: all of it)."""
        entry = self.entries.get(tuple(path))
        if entry is None:
            raise KeyError(f"{self.where}: no sharded tensor at {'/'.join(map(str, path))}")
        offset = offset or [0] * len(entry["shape"])
        shape = list(entry["shape"]) if shape is None else shape
        out = torch.empty(shape, dtype=getattr(torch, entry["dtype"]))
        covered = 0
        for piece in entry["pieces"]:
            lo = [max(a, b) for a, b in zip(offset, piece["offset"], strict=True)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offset, shape, piece["offset"], piece["shape"], strict=True)]
            if any(h <= low for low, h in zip(lo, hi, strict=True)):
                continue
            src = tuple(slice(low - p, h - p) for low, h, p in zip(lo, hi, piece["offset"], strict=True))
            dst = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, offset, strict=True))
            out[dst] = self._slice(piece)[src]
            covered += int(torch.tensor([h - low for low, h in zip(lo, hi, strict=True)]).prod())
        if covered != out.numel():
            raise ValueError(
                f"{self.where}: the pieces of {'/'.join(map(str, path))} cover {covered} of its "
                f"{out.numel()} elements in the requested box: a shard file is missing or damaged"
            )
        return out

    def read_like(self, path: TreePath, like: DTensor) -> DTensor:
        """The tensor at ``path``, sharded as ``like`` (this process's piece of it, on ``like``'s device)."""
        entry = self.entries.get(tuple(path))
        if entry is None or list(entry["shape"]) != list(like.shape):
            found = "nothing" if entry is None else f"shape {entry['shape']}"
            raise ValueError(f"{self.where}: {'/'.join(map(str, path))} holds {found}, expected {list(like.shape)}")
        return as_shard(self.read(path, *shard_box(like)), like)

    def consolidated(self) -> dict[str, Any]:
        """The whole checkpoint, every sharded tensor read in full: what ``torch.load`` of an unsharded one gives."""
        return _replace(self.meta, lambda path, leaf: self.read(path) if _is_sharded_leaf(leaf) else leaf)


def optimizer_states_by_index(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with its optimizer states in torch's layout (parameters numbered in the optimizer's order), as an
    unsharded run loads them, from FSDP's (keyed by parameter name; ``get_optimizer_state_dict``)."""
    converted = []
    for state in checkpoint.get("optimizer_states", []):
        ids: dict[str, int] = {}
        groups = []
        for group in state["param_groups"]:
            for name in group["params"]:
                ids.setdefault(name, len(ids))
            groups.append({**group, "params": [ids[name] for name in group["params"]]})
        by_index = {ids[name]: value for name, value in state["state"].items()}
        converted.append({"state": by_index, "param_groups": groups})
    return {**checkpoint, "optimizer_states": converted} if converted else checkpoint

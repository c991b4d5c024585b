"""Opening checkpoint files without running code from them, and writing them so that a kill or a full disk never
leaves a partial one.

A ``.ckpt``/``.pt`` file is a pickle: unpickled in full (``torch.load(weights_only=False)``) it can call any Python
function while it loads, before a single check of ours has run. Every file difflab opens — ``sample.py``/``eval.py``
``ckpt=``, ``train.py ckpt_path=``, the stage-1 ``model.autoencoder_ckpt`` of latent diffusion, the feature-net
weights, the FID statistics cache — goes through :func:`load_checkpoint`, which unpickles tensors and plain
containers only (``weights_only=True``). What difflab writes is exactly that: the run record is primitive
dicts/lists (``OmegaConf.to_container``), the random states are tensors and lists, and Lightning's own checkpoint
needs nothing beyond torch's default allow-list (tested for every model, optimizer and precision we configure), so
:data:`SAFE_GLOBALS` is empty: a type joins it only with a test showing a checkpoint of ours needs it.

A file that needs full unpickling — a foreign or crafted one, or one whose writer stored Python objects — is refused
with a message naming it; a stored config is checked before anything is built from it
(``hydra.utils.instantiate`` calls what it names: :mod:`difflab.utils.stored_config`). ``trust_checkpoint=true`` on the
command line (:func:`trusted_checkpoints`) opens such files in full: only for files you made yourself or got from
someone you trust. Third-party weights that a library unpickles in full itself (torch-fidelity's Inception,
torchvision's LPIPS backbones) are checked first by :func:`verify_weights_file`.

Writing: :class:`AtomicCheckpointIO` (the trainer's checkpoint plugin in ``src/train.py``).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from difflab.utils.paths import atomic_write
from difflab.utils.sharded_checkpoint import (
    ShardedCheckpointReader,
    is_sharded_checkpoint,
    optimizer_states_by_index,
)

log = logging.getLogger(__name__)

# Types beyond torch's default weights_only allow-list that checkpoints written by difflab/Lightning need: none.
SAFE_GLOBALS: list[Any] = []

_TRUST = contextvars.ContextVar("difflab_trust_checkpoint", default=False)


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe to open or was not written by difflab."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that can only be opened by unpickling arbitrary Python objects (which can run code)."""


@contextlib.contextmanager
def trusted_checkpoints(trust: bool) -> Iterator[None]:
    """Inside, :func:`load_checkpoint` opens files that need full unpickling (``trust_checkpoint=true``)."""
    token = _TRUST.set(bool(trust))
    try:
        yield
    finally:
        _TRUST.reset(token)


def checkpoints_trusted() -> bool:
    """Whether ``trust_checkpoint=true`` is in force (see :func:`trusted_checkpoints`)."""
    return _TRUST.get()


def load_checkpoint(path: str | Path, key: str = "ckpt", trust: bool | None = None, consolidate: bool = True) -> Any:
    """``torch.load`` of ``path`` onto the CPU, tensors and plain containers only; a sharded checkpoint (a directory
    written by ``trainer=fsdp``) is consolidated: the result is what the same run unsharded would have written.
    ``consolidate=False`` reads only what is not sharded (the run record, the step, the loops' state) of a sharded
    checkpoint, its sharded tensors left as placeholders: no model-sized read where only the record is wanted.

    ``key`` names the setting the path came from, for the messages (``ckpt``, ``ckpt_path``,
    ``model.autoencoder_ckpt``, ...). ``trust`` (default: :func:`checkpoints_trusted`) opens a file that needs
    full unpickling instead of refusing it. A config read from the file is checked where it is built
    (:func:`difflab.utils.stored_config.check_stored_config`). Raises :class:`CheckpointError` (missing or
    unreadable file) or :class:`UnsafeCheckpointError`.
    """
    path = Path(path)
    where = f"{key}={str(path)!r}"
    if is_sharded_checkpoint(path):  # trainer=fsdp's directory: consolidated here, as an unsharded run wrote it
        reader = ShardedCheckpointReader(path, lambda meta: load_checkpoint(meta, key, trust), key)
        return optimizer_states_by_index(reader.consolidated()) if consolidate else reader.meta
    if not path.is_file():
        raise CheckpointError(f"{where}: no such file")
    trusted = checkpoints_trusted() if trust is None else trust
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err) or not _is_pickle(path):
            raise CheckpointError(f"{where}: cannot be read as a PyTorch checkpoint ({err})") from err
        if not trusted:
            raise UnsafeCheckpointError(_unsafe_message(where, str(err))) from None
    except Exception as err:  # torch raises several types for a corrupt file
        raise CheckpointError(f"{where}: cannot be read as a PyTorch checkpoint ({err})") from err
    else:
        return content
    log.warning("%s: opened with full unpickling (trust_checkpoint=true)", where)
    return torch.load(path, map_location="cpu", weights_only=False)


def verify_weights_file(path: str | Path, key: str, sha256: str) -> Path:
    """Check a third-party weights file before a library unpickles it in full (torch-fidelity's Inception,
    torchvision's LPIPS backbones: ``torch.load(weights_only=False)``): its SHA-256 must start with ``sha256`` (the
    whole published digest, or the prefix torch.hub names its files with); with a prefix only, the file must also
    open as tensors and plain containers (:func:`load_checkpoint`), so that even a forged prefix runs no code.
    ``trust_checkpoint=true`` skips both checks. Returns ``path``; raises :class:`UnsafeCheckpointError`."""
    path = Path(path)
    if checkpoints_trusted():
        return path
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(sha256):
        raise UnsafeCheckpointError(
            f"{key}={str(path)!r}: refused: its SHA-256 is {digest.hexdigest()}, not the published file's "
            f"({sha256}{'' if len(sha256) == 64 else '...'}). It is another or an altered file, which the library "
            "would unpickle in full (that can run code). Download the original again, or, if you trust this file, "
            "add trust_checkpoint=true to the command line."
        )
    if len(sha256) < 64:
        load_checkpoint(path, key)
    return path


def _is_pickle(path: Path) -> bool:
    """Whether ``path`` is a torch zip archive or a well-formed pickle stream (read, never executed): told apart
    from a corrupt file when ``weights_only`` refuses it."""
    if zipfile.is_zipfile(path):
        return True
    try:
        with path.open("rb") as file:
            for _ in pickletools.genops(file):
                pass
    except Exception:
        return False
    return True


def _unsafe_message(where: str, torch_message: str) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", torch_message)
    what = f" ({found.group(1)})" if found else ""
    return (
        f"{where}: refused: the file holds Python objects beyond tensors and plain containers{what}, and opening it "
        "would run code stored in it. difflab's own checkpoints never need that. If you made this file yourself or "
        "trust where it came from (e.g. a checkpoint from an older version), add trust_checkpoint=true to the "
        "command line to open it in full."
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with each file written to a temporary file in its own directory, flushed to the disk
    (fsync) and renamed over the target (``os.replace``, atomic within a filesystem).

    Why not Lightning's own atomic save: it goes through fsspec's local transaction, which writes the temporary file
    into the system temp directory and *moves* it into place; when that is another filesystem (a tmpfs ``/tmp``, a
    network log dir) the move is a copy into the target path, so a kill or a full disk during the copy leaves a
    truncated ``last.ckpt`` where the previous good one was. Here (:func:`difflab.utils.paths.atomic_write`) a failed
    write (e.g. ``OSError`` ENOSPC) removes its temporary file and leaves the previous checkpoint exactly as it was;
    it raises an ``OSError`` naming the cause and the file even where torch's zip writer reports only
    ``[enforce fail at inline_container.cc]``.
    """

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's load; a sharded checkpoint (``trainer=fsdp``'s directory) is consolidated first, so that a
        run on one device or under DDP resumes from it."""
        if is_sharded_checkpoint(path):
            return load_checkpoint(path, "ckpt_path", trust=not weights_only if weights_only is not None else None)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_write(path, fsync=True) as file:
            torch.save(checkpoint, file)

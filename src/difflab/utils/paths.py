"""Where files go: outputs into folders that are created when missing, caches under the user's cache directory;
every file written whole or not at all (:func:`atomic_write`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def ensure_parent(path: str | Path) -> Path:
    """``path`` with its parent folders created (``out=new/dir/x.json`` must not fail after minutes of work)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def ensure_dir(path: str | Path) -> Path:
    """The folder ``path``, created with its parents when missing."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def user_cache_dir(*parts: str) -> Path:
    """difflab's cache folder, as the XDG base-directory convention puts it (what pip, torch.hub and Hugging Face
    do): ``$DIFFLAB_CACHE`` if set, else ``$XDG_CACHE_HOME/difflab``, else ``~/.cache/difflab``; ``parts`` below it.
    Not created here (callers write with :func:`ensure_parent`)."""
    root = os.environ.get("DIFFLAB_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "difflab") if xdg else str(Path.home() / ".cache" / "difflab")
    return Path(root).expanduser().joinpath(*parts)


_UMASK = os.umask(0)  # read once (os.umask sets it to read it)
os.umask(_UMASK)


def check_writable(directory: str | Path, key: str) -> Path:
    """The folder ``directory`` (created when missing), after checking a file can be created in it; otherwise an
    ``OSError`` naming ``key`` (``out``, ``cache_dir``) — raised before a task computes anything it would then lose."""
    directory = Path(directory)
    try:
        ensure_dir(directory)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OSError(
            err.errno, f"{key}: cannot write in {directory} ({err.strerror or err}); choose another {key}="
        ) from err
    return directory


@contextlib.contextmanager
def atomic_write(path: str | Path, fsync: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary file beside it (parents created), renamed over ``path``
    only when the block completes (``os.replace``, atomic within a filesystem), so a reader, a kill or a full disk
    never sees a partial file; a failure removes the temporary file and leaves ``path`` as it was. ``fsync``: flush
    the data and the rename to the disk (checkpoints). A failed write raises an ``OSError`` naming the cause and
    ``path``, also where a library hides it (torch's zip writer reports ENOSPC as ``[enforce fail at
    inline_container.cc]``, with the ``OSError`` only as its context)."""
    path = ensure_parent(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs private: the mode open() gives
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            if fsync:
                os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        cause = _os_error(err)
        if cause is not None and (cause is not err or str(path) not in str(err)):
            raise OSError(cause.errno, f"{cause.strerror or cause} while writing {path}") from err
        raise
    if fsync:
        _fsync_directory(path.parent)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`; returns the path."""
    with atomic_write(path) as file:
        file.write(text.encode())
    return Path(path)


def _os_error(err: BaseException | None) -> OSError | None:
    """The first ``OSError`` in ``err``'s chain of causes and contexts (``err`` itself included)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

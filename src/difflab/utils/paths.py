"""Where files go: outputs into folders that are created when missing, caches under the user's cache directory."""

from __future__ import annotations

import os
from pathlib import Path


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

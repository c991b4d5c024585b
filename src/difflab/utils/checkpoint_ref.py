"""Checkpoint references: a local path, or ``wandb:<entity>/<project>/<artifact>:<alias>``, a model artifact that
Lightning's ``WandbLogger(log_model=...)`` uploaded (``logger.wandb.log_model=true``), fetched into the user cache.

wandb's own ``Api().artifact(...).download()`` does the fetching; this module only names the file inside and turns
a failure (no network, no login, no such artifact) into one error that says what to do instead."""

from __future__ import annotations

import functools
import re
from pathlib import Path

from difflab.utils.paths import user_cache_dir

WANDB_PREFIX = "wandb:"


def is_wandb_ref(ref: object) -> bool:
    return isinstance(ref, str) and ref.startswith(WANDB_PREFIX)


@functools.lru_cache(maxsize=16)
def fetch_checkpoint(ref: str, key: str = "ckpt") -> str:
    """The local file of checkpoint reference ``ref`` (given as config key ``key``): a path is returned as is; a
    ``wandb:`` artifact is downloaded (once per process; wandb skips files it already has) to
    ``<user cache>/wandb_artifacts/<artifact>`` and its one ``.ckpt`` file returned."""
    if not is_wandb_ref(ref):
        return ref
    name = ref[len(WANDB_PREFIX) :]
    root = user_cache_dir("wandb_artifacts", re.sub(r"[^A-Za-z0-9._-]+", "_", name))
    try:
        import wandb

        folder = Path(wandb.Api().artifact(name, type="model").download(root=str(root)))
    except Exception as err:  # wandb raises its own CommError/ValueError/requests errors: all mean "not fetched"
        raise ValueError(
            f"{key}={ref}: could not fetch the wandb artifact {name!r} ({type(err).__name__}: {err}). It needs a "
            "network and a wandb login (WANDB_API_KEY). Without them, download it on another machine with "
            f"`wandb artifact get {name} --root DIR` and pass {key}=DIR/model.ckpt"
        ) from err
    files = sorted(folder.glob("*.ckpt"))
    if len(files) != 1:
        raise ValueError(
            f"{key}={ref}: the artifact holds {[p.name for p in folder.iterdir()]}; expected one .ckpt file (a "
            "model artifact of logger.wandb.log_model)"
        )
    return str(files[0])

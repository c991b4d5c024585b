"""Write a data set as shards for ``data=streaming``: ``python src/stream.py data=fashion_mnist data.image_size=16
out_dir=DIR`` (LitData's ``optimize``; the format is :mod:`difflab.data.shards`)."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from difflab.data.shards import MANIFEST, SPLITS, STORES, is_remote, write_shards

log = logging.getLogger(__name__)


def _check(cfg: DictConfig) -> tuple[Path, list[str], int]:
    out_dir = cfg.get("out_dir")
    if not out_dir or not isinstance(out_dir, str) or is_remote(out_dir):
        raise ValueError(
            f"out_dir={out_dir!r}: expected a local folder (copy it to an object store afterwards, e.g. "
            "`aws s3 sync DIR s3://bucket/path`)"
        )
    splits = list(cfg.get("splits") or [])
    if "train" not in splits or not set(splits) <= set(SPLITS) or len(set(splits)) != len(splits):
        raise ValueError(f"splits={splits!r}: expected train and any of val, test, each once")
    workers = cfg.get("num_workers")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"num_workers={workers!r}: expected an integer >= 0 (litdata.optimize's processes; 0: none)")
    if cfg.get("store") not in STORES:
        raise ValueError(f"store={cfg.get('store')!r}: expected one of {', '.join(STORES)}")
    chunk = cfg.get("chunk_bytes")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, str)) or (isinstance(chunk, int) and chunk < 1):
        raise ValueError(f"chunk_bytes={chunk!r}: expected a byte count or a size such as 64MB")
    return Path(out_dir).expanduser(), splits, workers


def _existing(out_dir: Path, overwrite: bool) -> list[Path]:
    """What a previous write left in ``out_dir`` (to replace); an error unless ``overwrite``."""
    existing = [p for p in (out_dir / MANIFEST, *(out_dir / s for s in SPLITS)) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"out_dir={str(out_dir)!r} already holds {', '.join(p.name for p in existing)}: pass overwrite=true to "
            "replace them, or choose another out_dir"
        )
    return existing


def _clear(existing: list[Path]) -> None:
    """Remove a previous shard set, its manifest first: a write cut short leaves a set without one (detectably
    unfinished), never an old manifest over new shards."""
    for path in sorted(existing, key=lambda p: p.name != MANIFEST):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def source_config(cfg: DictConfig) -> DictConfig:
    """The configured data, with random flips off (shards hold the items as they are; the streaming module flips
    when it reads) and batches of 1 (the writer reads items, and a small set may hold fewer than a batch)."""
    data_cfg = cfg.data.copy()
    with open_dict(data_cfg):
        for key, value in (("random_flip", False), ("batch_size", 1)):
            if key in data_cfg:
                data_cfg[key] = value
    return data_cfg


def stream(cfg: DictConfig) -> dict[str, Any]:
    """Write the splits of ``cfg.data`` under ``cfg.out_dir`` and the manifest last; returns the manifest."""
    start = time.perf_counter()
    out_dir, splits, workers = _check(cfg)
    existing = _existing(out_dir, bool(cfg.get("overwrite", False)))
    data_cfg = source_config(cfg)
    module = instantiate(data_cfg)
    module.setup()  # the data is there and readable before anything is removed
    _clear(existing)
    datasets = {s: getattr(module, s, None) for s in splits}
    for split in [s for s, d in datasets.items() if d is None or len(d) == 0]:
        log.info("%s: empty in data=%s, not written", split, data_cfg._target_)
        del datasets[split]
    num_classes = getattr(module, "num_classes", None)
    manifest = write_shards(
        datasets,
        out_dir,
        store=cfg.store,
        chunk_bytes=cfg.chunk_bytes,
        num_workers=workers,
        num_classes=num_classes if isinstance(num_classes, int) else None,
        class_names=tuple(getattr(module, "class_names", ()) or ()),
        source=OmegaConf.to_container(data_cfg, resolve=True),
    )
    shape = manifest["shape"]
    size = f" data.channels={shape[0]} data.image_size={shape[-1]}" if len(shape) == 3 else ""
    log.info("Wrote %s in %.1f s. Train on it:", out_dir / MANIFEST, time.perf_counter() - start)
    log.info("python src/train.py data=streaming data.input_dir=%s%s", out_dir, size)
    return manifest

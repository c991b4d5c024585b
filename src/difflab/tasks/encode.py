"""``python src/encode.py autoencoder_ckpt=... data=... out_dir=...``: encode an image data set once with a frozen
stage-1 autoencoder into a latent cache (:mod:`difflab.data.latent_cache`), which ``data=latents`` trains from.

Each split is encoded in eval mode without gradients, in float32, in batches of ``batch_size`` that never straddle a
shard (so a shard's moments equal ``encode_moments`` of the same batches bit for bit). Everything is written into
``.<name>.partial-<pid>`` beside ``out_dir`` and renamed into place at the end: a killed encode leaves no folder
that looks like a cache. An existing cache of the same autoencoder (weights hash) and data (identity hash) is kept
as it is; one of another autoencoder or data is an error unless ``overwrite=true``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from difflab.data.base import ImageDataModule
from difflab.data.latent_cache import (
    FORMAT,
    MANIFEST,
    SPLITS,
    VERSION,
    data_identity,
    identity_differences,
    read_manifest,
    shard_name,
    write_safetensors,
)
from difflab.data.latents import LatentDataModule
from difflab.data.pairs import PairsDataModule
from difflab.data.transforms import collate_images
from difflab.modules.autoencoder import load_autoencoder
from difflab.networks.autoencoder import Autoencoder
from difflab.tasks.sample import resolve_device
from difflab.utils.checkpoint_io import trusted_checkpoints
from difflab.utils.hashing import state_dict_sha256
from difflab.utils.paths import write_text_atomic
from difflab.utils.progress import progress_iter

log = logging.getLogger(__name__)


def _check_settings(cfg: DictConfig) -> list[str]:
    for key in ("batch_size", "shard_size"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}: expected an integer >= 1")
    if cfg.shard_size % cfg.batch_size:
        raise ValueError(
            f"shard_size={cfg.shard_size} is not a multiple of batch_size={cfg.batch_size}: a batch must not straddle "
            "two shards"
        )
    splits = list(cfg.get("splits") or [])
    if "train" not in splits or any(s not in SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise ValueError(f"splits={splits}: expected distinct entries of {list(SPLITS)}, train among them")
    return splits


def _inputs(cfg: DictConfig) -> tuple[Autoencoder, dict[str, Any], ImageDataModule, dict[str, Any]]:
    """(the frozen autoencoder, its run config, the image data module, its resolved config), checked to match."""
    with trusted_checkpoints(bool(cfg.get("trust_checkpoint", False))):
        autoencoder, ae_config = load_autoencoder(cfg.autoencoder_ckpt)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    datamodule = instantiate(cfg.data, batch_size=1)  # loader settings: none of the encoder's business
    if not isinstance(datamodule, ImageDataModule) or isinstance(datamodule, (LatentDataModule, PairsDataModule)):
        raise ValueError(
            f"data={data_cfg.get('_target_')}: encode.py encodes image data (fashion_mnist, image_folder, ...)"
        )
    shape = (autoencoder.in_channels, autoencoder.image_size, autoencoder.image_size)
    if datamodule.image_shape != shape:
        raise ValueError(
            f"autoencoder_ckpt={str(cfg.autoencoder_ckpt)!r} encodes images of shape {shape}, but the data gives "
            f"{datamodule.image_shape}: set data.channels={shape[0]} data.image_size={shape[1]}"
        )
    return autoencoder, ae_config, datamodule, data_cfg


def encode(cfg: DictConfig) -> dict[str, Any]:
    """Write (or find up to date) the cache of ``cfg.data`` under ``cfg.autoencoder_ckpt``; returns ``out_dir``,
    ``manifest`` and ``written`` (false when an identical cache was already there)."""
    splits = _check_settings(cfg)
    autoencoder, ae_config, datamodule, data_cfg = _inputs(cfg)
    identity = {
        "autoencoder": state_dict_sha256(autoencoder),
        "data": data_identity(data_cfg),
        "splits": splits,
        "shard_size": int(cfg.shard_size),
    }
    out = Path(cfg.out_dir).expanduser()
    if _up_to_date(out, identity, bool(cfg.get("overwrite", False))):
        log.info("Latent cache %s is up to date (the same autoencoder and data): nothing to encode", out)
        return {"out_dir": str(out), "manifest": read_manifest(out, "out_dir"), "written": False}
    datamodule.setup("fit")
    device = resolve_device(str(cfg.get("device", "auto")))
    manifest = _manifest(cfg, autoencoder, ae_config, datamodule, data_cfg, identity)
    start = time.perf_counter()
    with _partial_dir(out) as work:
        autoencoder.to(device).eval()
        for split in splits:
            dataset = getattr(datamodule, split)
            if dataset is None:
                raise ValueError(f"splits: data={data_cfg['_target_']} has no {split} split")
            manifest["splits"][split] = encode_split(autoencoder, dataset, split, work, cfg, device)
        manifest["encode"]["seconds"] = round(time.perf_counter() - start, 3)
        write_text_atomic(work / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    counts = ", ".join(f"{s} {e['count']}" for s, e in manifest["splits"].items())
    log.info(
        "Latent cache: %s (%s; %.1f s). Train from it: data=latents data.cache_dir=%s",
        out,
        counts,
        manifest["encode"]["seconds"],
        out,
    )
    return {"out_dir": str(out), "manifest": manifest, "written": True}


def _up_to_date(out: Path, identity: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``out`` already holds this very cache; an error when it holds another one (or something that is not
    a cache) and ``overwrite`` is false."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return False
    if not (out / MANIFEST).is_file():
        raise FileExistsError(
            f"out_dir={str(out)!r} exists and is not a latent cache (no {MANIFEST}): choose another out_dir (encode.py "
            "never deletes what it did not write)"
        )
    recorded = read_manifest(out, "out_dir")
    differences = identity_differences(recorded["data"], identity["data"])
    if recorded["autoencoder"]["sha256"] != identity["autoencoder"]:
        differences.insert(0, f"autoencoder sha256: {recorded['autoencoder']['sha256']} → {identity['autoencoder']}")
    for key in ("splits", "shard_size"):
        if recorded["identity"][key] != identity[key]:
            differences.append(f"{key}: {recorded['identity'][key]} → {identity[key]}")
    if not differences:
        return not overwrite
    if overwrite:
        return False
    raise FileExistsError(
        f"out_dir={str(out)!r} holds a latent cache of another autoencoder or data ("
        + "; ".join(differences)
        + "): choose another out_dir, or overwrite=true to replace it"
    )


def _manifest(
    cfg: DictConfig,
    autoencoder: Autoencoder,
    ae_config: dict[str, Any],
    datamodule: ImageDataModule,
    data_cfg: dict[str, Any],
    identity: dict[str, Any],
) -> dict[str, Any]:
    kl = autoencoder.quantizer is None
    latent = list(autoencoder.latent_shape)
    flipped = bool(getattr(datamodule.train, "random_flip", False))
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "identity": {"splits": identity["splits"], "shard_size": identity["shard_size"]},
        "autoencoder": {
            "ckpt": str(cfg.autoencoder_ckpt),
            "sha256": identity["autoencoder"],
            "regularizer": "kl" if kl else "vq",
            "latent_shape": latent,
            "net": (ae_config.get("model") or {}).get("net"),
        },
        "moments": {
            "kind": "kl_mean_logvar" if kl else "vq_z_e",
            "layout": "[mean, logvar] on the channel axis (std = exp(logvar / 2))" if kl else "z_e (pre-quantisation)",
            "shape": [2 * latent[0] if kl else latent[0], *latent[1:]],
            "dtype": "float32",
            "flipped": flipped,
        },
        "data": {
            **identity["data"],
            "image_shape": list(datamodule.image_shape),
            "num_classes": datamodule.num_classes,
            "class_names": list(datamodule.class_names),
            "source_config": data_cfg,
        },
        "shard_size": int(cfg.shard_size),
        "splits": {},
        "encode": {"batch_size": int(cfg.batch_size), "device": str(resolve_device(str(cfg.get("device", "auto"))))},
    }


class _partial_dir:
    """A fresh ``.<name>.partial-<pid>`` folder beside ``out``, renamed to ``out`` when the block completes (an
    existing ``out`` being replaced is moved aside first and removed after), removed when it fails."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.work = out.parent / f".{out.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir()
        return self.work

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            return
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.work, self.out)
        shutil.rmtree(old, ignore_errors=True)


def _item_keys(dataset: Dataset, start: int, stop: int, flip: bool | None) -> list:
    """Keys of items start..stop: (index, flip) for a set with random flips (never drawn at random here)."""
    if flip is None:
        return list(range(start, stop))
    return [(i, flip) for i in range(start, stop)]


@torch.no_grad()
def _encode_items(
    autoencoder: Autoencoder, dataset: Dataset, keys: list, cfg: DictConfig, device: torch.device, content: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(moments float32 on the CPU, labels) of ``keys``, in batches of ``cfg.batch_size``; ``content``: a hash fed
    the images and labels (None: not hashed)."""
    loader = DataLoader(dataset, batch_size=int(cfg.batch_size), sampler=keys, collate_fn=collate_images)
    moments, labels = [], []
    for x, y in loader:
        if content is not None:
            content.update(x.contiguous().numpy().tobytes())
            content.update(y.to(torch.int64).numpy().tobytes())
        moments.append(autoencoder.encode_moments(x.to(device)).float().cpu())
        labels.append(y.to(torch.int64))
    return torch.cat(moments), torch.cat(labels)


def _shards(count: int, size: int) -> Iterator[tuple[int, int, int]]:
    for index, start in enumerate(range(0, count, size)):
        yield index, start, min(start + size, count)


def encode_split(
    autoencoder: Autoencoder, dataset: Dataset, split: str, work: Path, cfg: DictConfig, device: torch.device
) -> dict[str, Any]:
    """Encode ``dataset`` into ``work/<split>-NNNNN.safetensors`` shards; returns the split's manifest entry."""
    flips = bool(getattr(dataset, "random_flip", False))
    content, shards = hashlib.sha256(), []
    total = -(-len(dataset) // int(cfg.shard_size))
    items = _shards(len(dataset), int(cfg.shard_size))
    for index, start, stop in progress_iter(
        items, total, f"encoding {split}", "shard", bool(cfg.get("progress", True))
    ):
        moments, labels = _encode_items(
            autoencoder, dataset, _item_keys(dataset, start, stop, False if flips else None), cfg, device, content
        )
        tensors = {"moments": moments, "labels": labels}
        if flips:  # the mirrored images' moments too: the epoch order picks one per item (difflab.data.order)
            tensors["moments_flip"] = _encode_items(
                autoencoder, dataset, _item_keys(dataset, start, stop, True), cfg, device, None
            )[0]
        metadata = {"format": FORMAT, "split": split, "first": str(start), "count": str(stop - start)}
        written = write_safetensors(work / shard_name(split, index), tensors, metadata)
        shards.append({"file": shard_name(split, index), "count": stop - start, **written})
    return {"count": len(dataset), "content_sha256": content.hexdigest(), "shards": shards}

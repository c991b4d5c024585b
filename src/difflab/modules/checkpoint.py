"""Reading difflab checkpoints: everything a sampler needs travels inside them (the resolved run config).

A checkpoint written by ``src/train.py`` holds, next to Lightning's keys, ``checkpoint["difflab"]`` =
``{"config": <resolved train config>, "loggers": [...], "version": ...}`` (see
:class:`difflab.callbacks.RunRecord`). With EMA on, ``state_dict`` holds the EMA weights (the EMA callback,
:class:`difflab.callbacks.EMA`, puts the raw ones under ``current_model_state``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from difflab.modules.autoencoder import LoadedCheckpoint
from difflab.modules.diffusion import DiffusionModule


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or was not written by difflab."""


def _load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt={str(path)!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for a corrupt file
        raise CheckpointError(f"ckpt={str(path)!r}: cannot be read as a PyTorch checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or "difflab" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"ckpt={str(path)!r}: not a difflab checkpoint (expected the keys 'state_dict' and 'difflab'; "
            "checkpoints are written by src/train.py)"
        )
    return checkpoint


def read_run_record(path: str | Path) -> dict[str, Any]:
    """The ``difflab`` record of a checkpoint: ``config`` (dict), ``loggers`` (list), ``global_step``."""
    checkpoint = _load(path)
    return {**checkpoint["difflab"], "global_step": checkpoint.get("global_step", 0)}


def load_module(
    path: str | Path,
    sampler: DictConfig | dict | None = None,
    map_location: str | torch.device = "cpu",
    compile: str | None = None,
    precision: str | None = None,
) -> tuple[DiffusionModule, dict[str, Any]]:
    """Rebuild the trained module from a checkpoint alone, optionally with another sampler config and, with
    ``compile`` (none | default | reduce-overhead | max-autotune), another ``model.compile`` than in training; with
    ``precision`` (a trainer precision: 32-true | bf16-mixed | 16-mixed) another ``model.sample_precision``.

    Returns (module in eval mode with the EMA weights when EMA was on, the run record).
    """
    checkpoint = _load(path)
    record = checkpoint["difflab"]
    model_cfg = OmegaConf.create(record["config"]["model"])
    if sampler is not None:
        model_cfg.sampler = sampler
    if compile is not None and "compile" in model_cfg:
        model_cfg.compile = compile
    if precision is not None:  # also for checkpoints from before model.sample_precision (which sample in fp32)
        model_cfg.sample_precision = precision
    extra: dict[str, Any] = {}
    if checkpoint.get("autoencoder_config") and "autoencoder_ckpt" in model_cfg:
        # latent diffusion: the checkpoint carries its stage 1; never depend on the file named at training time,
        # and build the stage 1 from this checkpoint as already read (instantiate passes the object through)
        extra["autoencoder_ckpt"] = LoadedCheckpoint(str(path), checkpoint)
    module = instantiate(model_cfg, **extra)
    missing, unexpected = module.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"ckpt={str(path)!r}: weights do not match the model of its own config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    module.on_load_checkpoint(checkpoint)  # what modules keep beside the weights (latent scale, t-sampler state)
    module.configure_model()  # model.compile applies to sampling too
    return module.to(map_location).eval(), {**record, "global_step": checkpoint.get("global_step", 0)}

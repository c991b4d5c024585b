"""Reading difflab checkpoints: everything a sampler needs travels inside them (the resolved run config).

A checkpoint written by ``src/train.py`` holds, next to Lightning's keys, ``checkpoint["difflab"]`` =
``{"config": <resolved train config>, "loggers": [...], "version": ...}`` (see
:class:`difflab.callbacks.RunRecord`). With EMA on, ``state_dict`` holds the EMA weights (the EMA callback,
:class:`difflab.callbacks.EMA`, puts the raw ones under ``current_model_state``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from difflab.modules.autoencoder import LoadedCheckpoint
from difflab.modules.diffusion import DiffusionModule
from difflab.utils.checkpoint_io import CheckpointError, load_checkpoint


def _load(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """The checkpoint at ``path`` (tensors and plain containers only, see :mod:`difflab.utils.checkpoint_io`)."""
    checkpoint = load_checkpoint(path, key)
    if not isinstance(checkpoint, dict) or "difflab" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{key}={str(path)!r}: not a difflab checkpoint (expected the keys 'state_dict' and 'difflab'; "
            "checkpoints are written by src/train.py)"
        )
    return checkpoint


def read_run_record(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """The ``difflab`` record of a checkpoint: ``config`` (dict), ``loggers`` (list), ``global_step``."""
    checkpoint = _load(path, key)
    return {**checkpoint["difflab"], "global_step": checkpoint.get("global_step", 0)}


def sampler_config(trained: DictConfig | dict, given: DictConfig | dict | None) -> DictConfig:
    """The sampler config to build: ``given`` when it names a sampler (``sampler=ddim ...``: it has a ``_target_``),
    else the ``trained`` one with the keys ``given`` sets (``sampler.steps=50`` alone). Keys left unset (``???``
    in ``conf/sample.yaml``) are ignored; a key the trained sampler does not take fails here, naming it."""
    trained = OmegaConf.create(trained)
    if given is None:
        return trained
    given = OmegaConf.create(given)
    chosen = {key: given[key] for key in given if not OmegaConf.is_missing(given, key)}
    if "_target_" in chosen:
        return OmegaConf.create(chosen)
    target = trained.get("_target_", "")
    accepted = _sampler_arguments(target)
    unknown = sorted(key for key in chosen if accepted is not None and key not in accepted)
    if unknown:
        raise ValueError(
            f"sampler.{unknown[0]}: the checkpoint's sampler ({target.rsplit('.', 1)[-1]}) has no such setting; "
            f"choose a sampler that has it, e.g. sampler=ddim sampler.{unknown[0]}=..."
        )
    return OmegaConf.merge(trained, chosen)


def _sampler_arguments(target: str) -> set[str] | None:
    """Keyword arguments of a sampler class and its bases (None: it takes any)."""
    sampler_class = get_method(target) if target else None
    if not isinstance(sampler_class, type):
        return None
    names: set[str] = set()
    for cls in sampler_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names.update(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return names or None


def load_module(
    path: str | Path,
    sampler: DictConfig | dict | None = None,
    map_location: str | torch.device = "cpu",
    compile: str | None = None,
    precision: str | None = None,
) -> tuple[DiffusionModule, dict[str, Any]]:
    """Rebuild the trained module from a checkpoint alone, optionally with another sampler config (see
    :func:`sampler_config`) and, with
    ``compile`` (none | default | reduce-overhead | max-autotune), another ``model.compile`` than in training; with
    ``precision`` (a trainer precision: 32-true | bf16-mixed | 16-mixed) another ``model.sample_precision``.

    Returns (module in eval mode with the EMA weights when EMA was on, the run record).
    """
    checkpoint = _load(path)
    record = checkpoint["difflab"]
    model_cfg = OmegaConf.create(record["config"]["model"])
    if "sampler" in model_cfg:  # diffusion models (a classifier checkpoint has no sampler)
        model_cfg.sampler = sampler_config(model_cfg.sampler, sampler)
    elif sampler is not None:
        raise CheckpointError(f"ckpt={str(path)!r}: a {model_cfg.get('_target_')} checkpoint takes no sampler")
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

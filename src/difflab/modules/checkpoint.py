"""Reading difflab checkpoints: everything a sampler needs travels inside them (the resolved run config).

A checkpoint written by ``src/train.py`` holds, next to Lightning's keys, ``checkpoint["difflab"]`` =
``{"config": <resolved train config>, "loggers": [...], "version": ...}`` (see
:class:`difflab.callbacks.RunRecord`). With EMA on, ``state_dict`` holds the EMA weights (the EMA callback,
:class:`difflab.callbacks.EMA`, puts the raw ones under ``current_model_state``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

from difflab.callbacks.ema import young_ema_warning
from difflab.modules.autoencoder import LoadedCheckpoint
from difflab.modules.diffusion import DiffusionModule
from difflab.samplers import Sampler
from difflab.samplers.analytic import verify_gamma_weights, with_gamma_path
from difflab.utils.checkpoint_io import CheckpointError, load_checkpoint
from difflab.utils.stored_config import check_stored_config

log = logging.getLogger(__name__)

WEIGHTS = ("ema", "raw")


def select_weights(checkpoint: dict[str, Any], weights: str, path: str | Path) -> dict[str, Any]:
    """The state dict to sample with: ``ema`` (``state_dict``: the EMA weights when EMA was on, warning when they
    are still mostly the random start) or ``raw`` (the trained weights themselves: ``current_model_state``, or
    ``state_dict`` when the run had no EMA)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {list(WEIGHTS)}")
    has_ema = "current_model_state" in checkpoint
    if weights == "raw":
        return checkpoint["current_model_state"] if has_ema else checkpoint["state_dict"]
    ema_cfg = ((checkpoint["difflab"].get("config") or {}).get("callbacks") or {}).get("ema") or {}
    count = (checkpoint.get("averaging_state") or {}).get("n_averaged")
    if has_ema and count is not None and "decay" in ema_cfg:
        warning = young_ema_warning(float(ema_cfg["decay"]), bool(ema_cfg.get("warmup", False)), int(count))
        if warning:
            log.warning("ckpt=%s: %s", path, warning)
    return checkpoint["state_dict"]


def _load(path: str | Path, key: str = "ckpt", consolidate: bool = True) -> dict[str, Any]:
    """The checkpoint at ``path`` (tensors and plain containers only, see :mod:`difflab.utils.checkpoint_io`;
    ``consolidate``: as there)."""
    checkpoint = load_checkpoint(path, key, consolidate=consolidate)
    if not isinstance(checkpoint, dict) or "difflab" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{key}={str(path)!r}: not a difflab checkpoint (expected the keys 'state_dict' and 'difflab'; "
            "checkpoints are written by src/train.py)"
        )
    return checkpoint


def stored_data_module(record: dict[str, Any], where: str, data_dir: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The data module of a run record (``read_run_record``/``load_module``) read from ``where``
    (``ckpt='run/last.ckpt'``), its config checked first (:func:`check_stored_config`), and the config it was built
    from; ``data_dir`` replaces the recorded folder (the data may live elsewhere on this machine)."""
    data_cfg = dict(record["config"]["data"])
    check_stored_config(data_cfg, where, "difflab.config.data")
    if data_dir:
        data_cfg["data_dir"] = data_dir
    datamodule = instantiate(data_cfg)
    if hasattr(datamodule, "image_data"):  # data=latents: the images its cache was encoded from
        return datamodule.image_data(data_dir)
    return datamodule, data_cfg


def read_run_record(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """The ``difflab`` record of a checkpoint: ``config`` (dict), ``loggers`` (list), ``global_step``."""
    checkpoint = _load(path, key, consolidate=False)  # a sharded checkpoint's tensors are not needed here
    return {**checkpoint["difflab"], "global_step": checkpoint.get("global_step", 0)}


def sampler_config(
    trained: DictConfig | dict, given: DictConfig | dict | None, fallback: DictConfig | dict | None = None
) -> DictConfig:
    """The sampler config to build: ``given`` when it names a sampler (``sampler=ddim ...``: it has a ``_target_``),
    else the ``trained`` one with the keys ``given`` sets (``sampler.steps=50`` alone). Keys left unset (``???``
    in ``conf/sample.yaml``) are ignored; a key the trained sampler does not take fails here, naming it.

    ``fallback``: used instead of ``given`` when ``given`` is a default the user did not choose (sample.py's
    ``dpmpp_2m_sde``) and samples another process than the checkpoint's (a rectified flow): the checkpoint's own
    sampler with the keys the user set."""
    trained = OmegaConf.create(trained)
    if given is None:
        return trained
    given = OmegaConf.create(given)
    chosen = {key: given[key] for key in given if not OmegaConf.is_missing(given, key)}
    if (
        "_target_" in chosen
        and fallback is not None
        and not _process_kinds(chosen["_target_"]) & _process_kinds(trained.get("_target_", ""))
    ):
        log.info("the checkpoint's sampler is for another process: sampling with its own (%s)", trained._target_)
        return sampler_config(trained, fallback)
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


def _sets_anything(given: DictConfig | dict) -> bool:
    """Whether a sampler config from the command line sets a key (sample.py's and eval.py's leave them at ???)."""
    given = OmegaConf.create(given)
    return any(not OmegaConf.is_missing(given, key) for key in given)


def _process_kinds(target: str) -> set[str]:
    """The processes a sampler class integrates (``gaussian``, ``sigma``, ``flow``: :attr:`Sampler.process_kinds`)."""
    sampler_class = get_method(target) if target else None
    return set(getattr(sampler_class, "process_kinds", ("gaussian",)))


def _own_sampler(target: str) -> bool:
    """Whether the module class ``target`` samples with its own sampler by default (few-step models, see
    :class:`difflab.modules.teacher.FewStepMixin`): sample.py's default sampler does not replace it."""
    module_class = get_method(target) if target else None
    return bool(getattr(module_class, "own_sampler", False))


def _sampler_arguments(target: str) -> set[str] | None:
    """Keyword arguments a config may give the sampler class ``target`` (None: not a sampler class)."""
    sampler_class = get_method(target) if target else None
    return (
        sampler_class.setting_names()
        if isinstance(sampler_class, type) and issubclass(sampler_class, Sampler)
        else None
    )


def load_module(
    path: str | Path,
    sampler: DictConfig | dict | None = None,
    map_location: str | torch.device = "cpu",
    compile: str | None = None,
    precision: str | None = None,
    weights: str = "ema",
    sampler_fallback: DictConfig | dict | None = None,
    key: str = "ckpt",
) -> tuple[DiffusionModule, dict[str, Any]]:
    """Rebuild the trained module from a checkpoint alone, optionally with another sampler config (see
    :func:`sampler_config`, also for ``sampler_fallback``) and, with
    ``compile`` (none | default | reduce-overhead | max-autotune), another ``model.compile`` than in training; with
    ``precision`` (a trainer precision: 32-true | bf16-mixed | 16-mixed) another ``model.sample_precision``;
    ``weights``: ``ema`` or ``raw`` (see :func:`select_weights`); ``key``: the setting ``path`` came from, for the
    messages (``ckpt``, ``classifier_ckpt``, ``upscaler_ckpt``, ``model.teacher_ckpt``).

    Returns (module in eval mode with the chosen weights, the run record with ``sampler``: the sampler config the
    module was built with, for reports of what drew the samples).
    """
    checkpoint = _load(path, key)
    record = checkpoint["difflab"]
    check_stored_config(record["config"]["model"], f"{key}={str(path)!r}", "difflab.config.model")
    model_cfg = OmegaConf.create(record["config"]["model"])
    if "sampler" in model_cfg:  # diffusion models (a classifier checkpoint has no sampler)
        if sampler_fallback is not None and _own_sampler(model_cfg.get("_target_", "")):
            sampler = sampler_fallback  # a few-step model: its own sampler (steps) unless the user chose one
        model_cfg.sampler = sampler_config(model_cfg.sampler, sampler, sampler_fallback)
        # Analytic-DPM: Γ from beside the checkpoint unless sampler.gamma names a file
        settings = _sampler_arguments(model_cfg.sampler.get("_target_", ""))
        model_cfg.sampler = with_gamma_path(model_cfg.sampler, path, settings)
    elif sampler is not None and _sets_anything(sampler):  # eval.py's all-??? node sets nothing
        raise CheckpointError(f"{key}={str(path)!r}: a {model_cfg.get('_target_')} checkpoint takes no sampler")
    if model_cfg.get("teacher_ckpt"):  # reflow's warm start: the weights come from this checkpoint
        model_cfg.teacher_ckpt = None
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
    missing, unexpected = module.load_state_dict(select_weights(checkpoint, weights, path), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{key}={str(path)!r}: weights do not match the model of its own config "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    module.on_load_checkpoint(checkpoint)  # what modules keep beside the weights (latent scale, t-sampler state)
    verify_gamma_weights(module, f"{key}={str(path)!r} (weights={weights})")  # Analytic-DPM's Γ is of these
    module.configure_model()  # model.compile applies to sampling too
    built = {"sampler": OmegaConf.to_container(model_cfg.sampler)} if "sampler" in model_cfg else {}
    return module.to(map_location).eval(), {**record, "global_step": checkpoint.get("global_step", 0), **built}

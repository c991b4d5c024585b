"""What a sample set shows: the class names or prompts of its images, the sampler and the guidance, stored in the
.npz (extra arrays) and in a JSON beside it, and the per-image tags that label the grid's rows or columns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from difflab.utils.labels import class_names_of, class_tags
from difflab.utils.paths import write_text_atomic


def class_names(record: dict[str, Any]) -> list[str] | None:
    """The class names of the checkpoint's data module (a class attribute; None when it has none, e.g. an image
    folder, whose names are only known from its files)."""
    target = (record["config"].get("data") or {}).get("_target_")
    try:
        return class_names_of(get_class(target)) if target else None
    except (ImportError, AttributeError, ValueError):
        return None


def image_tags(labels: torch.Tensor | None, prompts: list[str] | None, names: list[str] | None) -> list[str] | None:
    """One tag per image: its prompt, else its class name (``class i`` without names), else None."""
    if prompts is not None:
        return list(prompts)
    if labels is None:
        return None
    return class_tags(labels, names)


def guidance_info(cfg: DictConfig, module: Any) -> dict[str, Any]:
    """The guidance the samples were drawn with: CFG's w (the command's, else a class-conditional model's own) and
    classifier guidance's classifier checkpoint and scale s (None where not used)."""
    guidance = cfg.get("guidance_scale")
    if guidance is None and getattr(module, "conditional", False):
        guidance = getattr(module, "guidance_scale", None)
    classifier = getattr(module, "classifier_guidance", None)
    return {
        "guidance_scale": None if guidance is None else float(guidance),
        "classifier_ckpt": None if classifier is None else str(cfg.get("classifier_ckpt")),
        "classifier_scale": None if classifier is None else float(classifier.scale),
    }


def sample_info(
    cfg: DictConfig, module: Any, record: dict[str, Any], labels: torch.Tensor | None, prompts: list[str] | None
) -> dict[str, Any]:
    """What produced the samples: checkpoint, step, seed, weights, sampler (name and resolved config), guidance
    (CFG's w, the guiding classifier and its scale), labels with their class names, prompts."""
    sampler = record["sampler"]  # as load_module built it
    return {
        "ckpt": str(cfg.ckpt),
        "global_step": record["global_step"],
        "num_samples": int(labels.numel() if labels is not None else cfg.num_samples),
        "seed": int(cfg.seed),
        "weights": cfg.get("weights") or "ema",
        "sampler_name": str(sampler.get("_target_", "")).rsplit(".", 1)[-1],
        "sampler": sampler,
        **guidance_info(cfg, module),
        "labels": None if labels is None else labels.tolist(),
        "class_names": class_names(record) if labels is not None else None,
        "prompts": prompts,
    }


def npz_arrays(info: dict[str, Any]) -> dict[str, np.ndarray]:
    """The extra arrays of ``samples.npz``: ``sampler`` (name), ``sampler_config`` (JSON), ``guidance_scale``,
    ``classifier_ckpt`` and ``classifier_scale``, ``class_names``, ``prompts`` (per image), where they apply."""
    arrays = {"sampler": np.array(info["sampler_name"]), "sampler_config": np.array(json.dumps(info["sampler"]))}
    if info["guidance_scale"] is not None:
        arrays["guidance_scale"] = np.array(info["guidance_scale"], dtype=np.float32)
    if info.get("classifier_scale") is not None:
        arrays["classifier_ckpt"] = np.array(info["classifier_ckpt"])
        arrays["classifier_scale"] = np.array(info["classifier_scale"], dtype=np.float32)
    if info["class_names"]:
        arrays["class_names"] = np.array(info["class_names"])
    if info["prompts"]:
        arrays["prompts"] = np.array(info["prompts"])
    return arrays


def write_json(info: dict[str, Any], path: str | Path) -> Path:
    return write_text_atomic(path, json.dumps(info, indent=2, default=str))

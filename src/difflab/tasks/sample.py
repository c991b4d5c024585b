"""Sampling from a checkpoint alone: a PNG grid and a .npz of uint8 images."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from difflab.modules import DiffusionModule, load_module
from difflab.tasks.classifier_guidance import attach_classifier, guided_classes
from difflab.tasks.sample_info import image_tags, npz_arrays, sample_info, write_json
from difflab.tasks.sample_modes import interpolate, reconstruct
from difflab.utils.checkpoint_io import trusted_checkpoints
from difflab.utils.checkpoint_ref import fetch_checkpoint
from difflab.utils.distributed import gather_shards, process_group, rank_world, shard
from difflab.utils.images import save_npz
from difflab.utils.labels import class_rows, save_labelled_grid
from difflab.utils.sweep_summary import write_run_summary

log = logging.getLogger(__name__)


def load_for_sampling(cfg: DictConfig, device: torch.device) -> tuple[DiffusionModule, dict[str, Any]]:
    """``cfg.ckpt`` on ``device`` with the command line's sampler, compile, precision and batch size (opened
    safely unless ``trust_checkpoint``, see :mod:`difflab.utils.checkpoint_io`)."""
    with trusted_checkpoints(cfg.get("trust_checkpoint", False)):
        module, record = load_module(
            fetch_checkpoint(str(cfg.ckpt)),  # a path or a wandb:... model artifact
            sampler=cfg.get("sampler"),
            map_location=device,
            compile=cfg.get("compile"),
            precision=cfg.get("precision"),
            weights=cfg.get("weights") or "ema",
            sampler_fallback=default_sampler_fallback(cfg),
        )
        attach_classifier(cfg, module, device)  # classifier_ckpt= / classifier_scale= (classifier guidance)
    module.sample_batch_size = int(cfg.batch_size)
    return module, record


def default_sampler_fallback(cfg: DictConfig) -> dict[str, Any] | None:
    """When the sampler group is the config's default (the command line names no ``sampler=``), the settings
    to apply to the checkpoint's own sampler should the default not fit the checkpoint's process (a flow): the
    ``sampler.KEY=VALUE``s the user gave. None when the user chose a sampler (then a misfit is an error)."""
    if not HydraConfig.initialized() or cfg.get("sampler") is None:
        return None
    overrides = [str(o) for o in HydraConfig.get().overrides.task]
    if any(o.split("=", 1)[0].lstrip("+~") == "sampler" for o in overrides):
        return None
    keys = {
        o.split("=", 1)[0].lstrip("+").removeprefix("sampler.")
        for o in overrides
        if o.lstrip("+").startswith("sampler.")
    }
    return {key: cfg.sampler[key] for key in keys if key in cfg.sampler}


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def class_labels(classes: Any, num_classes: int | None, num_samples: int) -> tuple[torch.Tensor | None, int | None]:
    """Labels (num_samples,) and the grid row length for ``classes``: null (all classes in turn), ``all`` (one row
    per class), or a list of class indices (cycled). Unconditional models take no labels."""
    if not num_classes:
        if classes is not None:
            raise ValueError(f"classes={classes}: this checkpoint's model is not class-conditional")
        return None, None
    if classes is None:
        return torch.arange(num_samples) % num_classes, None
    if classes == "all":
        return class_rows(num_classes, num_samples)
    labels = torch.as_tensor(list(classes), dtype=torch.long)
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"classes={list(classes)}: expected indices in [0, {num_classes})")
    return labels.repeat(num_samples // labels.numel() + 1)[:num_samples], None


def prompt_list(prompt: Any, num_samples: int) -> list[str] | None:
    """``prompt``: null, one string (every sample) or a list (cycled) → num_samples prompts, or None."""
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else [str(p) for p in prompt]
    if not prompts:
        raise ValueError("prompt=[]: give a caption, e.g. prompt='a photo of a sneaker'")
    return [prompts[i % len(prompts)] for i in range(num_samples)]


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Load ``cfg.ckpt`` (optionally with another ``cfg.sampler``), draw ``cfg.num_samples`` seeded samples.

    Class-conditional checkpoints take ``classes`` and ``guidance_scale`` (w of classifier-free guidance);
    text-conditioned latent diffusion takes ``prompt`` (a caption, or a list cycled over the samples).
    Under ``torchrun --nproc_per_node N`` each rank draws every N-th sample with seed ``seed + rank``; rank 0 writes
    the gathered set (a single process keeps ``seed``, so its output does not depend on the launch).
    """
    if cfg.num_samples < 1:
        raise ValueError(f"num_samples={cfg.num_samples}: expected >= 1")
    start = time.perf_counter()
    with process_group(resolve_device(cfg.device)) as device:
        result = _sample(cfg, device)
    if "rank" not in result:  # rank 0: <run dir>/run_summary.json, a sample sweep's row (utils.sweep_summary)
        seconds = time.perf_counter() - start
        summary = {**result.get("summary", {}), "wall_time_s": seconds}
        if "num_samples" in summary:
            summary["samples_per_s"] = summary["num_samples"] / seconds
        output = result.get("npz") or result.get("grid")
        write_run_summary(cfg.out_dir, metrics={}, output=None if output is None else str(output), **summary)
    return result


def _sample(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    rank, world = rank_world()
    mode = cfg.get("mode", "generate")
    if world > 1 and mode != "generate":
        raise ValueError(f"mode={mode}: runs in one process; launch it without torchrun (only generate is sharded)")
    module, record = load_for_sampling(cfg, device)
    if mode != "generate" and getattr(getattr(module, "diffusion", None), "process_kind", None) == "sigma":
        raise ValueError(
            f"mode={mode}: the editing and inversion modes run DDIM on a discrete Gaussian diffusion; this checkpoint "
            "is an EDM-family (σ process) model, which samples with mode=generate"
        )
    if mode == "reconstruct":
        return reconstruct(cfg, module, record, device)
    if mode == "interpolate":
        return interpolate(cfg, module, device)
    from difflab.tasks.editing import EDIT_MODES, edit  # editing imports this module

    if mode in EDIT_MODES:
        return edit(cfg, module, device)
    if mode != "generate":
        raise ValueError(
            f"mode={mode!r}: expected one of [generate, reconstruct, interpolate, {', '.join(EDIT_MODES)}]"
        )
    prompts = prompt_list(cfg.get("prompt"), int(cfg.num_samples))
    if prompts is not None:
        labels, row = None, None
    else:
        labels, row = class_labels(cfg.get("classes"), guided_classes(module), int(cfg.num_samples))
    num = int(cfg.num_samples) if labels is None else labels.numel()
    index = shard(num, rank, world)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed) + rank)
    if index.numel():
        kwargs: dict[str, Any] = {"y": None if labels is None else labels[index]}
        if prompts is not None:  # text-conditioned latent diffusion
            kwargs = {"prompts": [prompts[i] for i in index.tolist()]}
        local = module.sample(
            index.numel(),
            generator=generator,
            guidance_scale=cfg.get("guidance_scale"),
            progress=cfg.get("progress", True),
            **kwargs,
        )
    else:  # more ranks than samples
        local = torch.empty((0, *module.output_shape), device=device)
    images = gather_shards(local.to(device), num)
    if rank != 0:
        return {"rank": rank}
    out_dir = Path(cfg.out_dir)
    info = sample_info(cfg, module, record, labels, prompts)  # class names / prompts, sampler, guidance
    sampler = module.sampler
    tags = image_tags(labels, prompts, info["class_names"])
    result = {
        "grid": save_labelled_grid(images, out_dir / "samples.png", nrow=cfg.get("nrow") or row, tags=tags),
        "npz": save_npz(images, out_dir / "samples.npz", labels=labels, extra=npz_arrays(info)),
        "json": write_json(info, out_dir / "samples.json"),
        "global_step": record["global_step"],
        "summary": {
            "sampler": info["sampler_name"],
            "steps": getattr(sampler, "num_steps", None),
            "nfe": sampler.num_evaluations(None),
            "guidance_scale": info["guidance_scale"],
            "num_samples": info["num_samples"],
        },
    }
    log.info(
        "Wrote %s, %s and %s (checkpoint step %d)", result["grid"], result["npz"], result["json"], record["global_step"]
    )
    return result

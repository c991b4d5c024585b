"""Sampling from a checkpoint alone: a PNG grid and a .npz of uint8 images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from difflab.modules import load_module
from difflab.utils.images import save_grid, save_npz

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sample(cfg: DictConfig) -> dict[str, Any]:
    """Load ``cfg.ckpt`` (optionally with another ``cfg.sampler``), draw ``cfg.num_samples`` seeded samples."""
    if cfg.num_samples < 1:
        raise ValueError(f"num_samples={cfg.num_samples}: expected >= 1")
    device = resolve_device(cfg.device)
    module, record = load_module(cfg.ckpt, sampler=cfg.get("sampler"), map_location=device)
    module.sample_batch_size = int(cfg.batch_size)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    images = module.sample(int(cfg.num_samples), generator=generator)
    out_dir = Path(cfg.out_dir)
    result = {
        "grid": save_grid(images, out_dir / "samples.png", nrow=cfg.get("nrow")),
        "npz": save_npz(images, out_dir / "samples.npz"),
        "global_step": record["global_step"],
    }
    log.info("Wrote %s and %s (checkpoint step %d)", result["grid"], result["npz"], record["global_step"])
    return result

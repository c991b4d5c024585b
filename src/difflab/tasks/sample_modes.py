"""DDIM's deterministic uses (Song et al. 2021 §5.3–5.4): encode-decode reconstruction and latent interpolation."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from difflab.metrics.reconstruction import ReconstructionMetrics
from difflab.modules.checkpoint import stored_data_module
from difflab.samplers import DDIMSampler, sample_loop
from difflab.utils.labels import save_labelled_grid
from difflab.utils.paths import ensure_dir
from difflab.utils.progress import count_forwards

log = logging.getLogger(__name__)


def _ddim(module: Any, mode: str) -> DDIMSampler:
    sampler = module.sampler
    if not isinstance(sampler, DDIMSampler) or not sampler.deterministic:
        raise ValueError(f"mode={mode} needs the deterministic DDIM sampler: add `sampler=ddim sampler.eta=0`")
    sampler.clip_denoised = False  # clipping x̂_0 would break the invertibility of the η = 0 map
    return sampler


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two latents (B, ...) (Shoemake 1985), as the DDIM paper interpolates x_T."""
    cos = (z0 * z1).flatten(1).sum(1) / (z0.flatten(1).norm(dim=1) * z1.flatten(1).norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).reshape(-1, *([1] * (z0.ndim - 1)))
    if float(theta.min()) < 1e-6:
        return (1 - alpha) * z0 + alpha * z1
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


def reconstruct(cfg: DictConfig, module: Any, record: dict, device: torch.device) -> dict[str, Any]:
    """Encode ``num_samples`` test images to x_T with the η = 0 inverse, decode them back, report PSNR/SSIM."""
    sampler = _ddim(module, "reconstruct")
    datamodule, _ = stored_data_module(record, f"ckpt={str(cfg.ckpt)!r}", cfg.get("data_dir"))
    datamodule.setup("test")
    x0, y = next(iter(torch.utils.data.DataLoader(datamodule.test, batch_size=int(cfg.num_samples))))
    x0 = x0.to(device)
    labels = y.to(device) if module.num_classes else None
    sampler.set_timesteps(None)
    nfe = 2 * sampler.num_evaluations(None)  # encode, then decode
    with torch.inference_mode(), count_forwards(module.net, nfe, "encode-decode", cfg.get("progress", True)):
        decoded = module.reconstruct(x0, labels, sampler)
    metrics = ReconstructionMetrics().to(device)
    metrics.update(decoded, x0)
    values = metrics.compute()
    psnr, ssim = values["psnr"], values["ssim"]
    out_dir = ensure_dir(cfg.out_dir)
    pairs = torch.stack([x0, decoded], dim=1).flatten(0, 1)  # original, reconstruction, original, ...
    result = {"psnr": psnr, "ssim": ssim, "num_images": x0.shape[0], "steps": len(sampler.timesteps)}
    log.info("Reconstruction of %d test images: PSNR %.2f dB, SSIM %.4f", x0.shape[0], psnr, ssim)
    (out_dir / "reconstruct.json").write_text(json.dumps(result, indent=2))
    tags = ["original", "reconstruction"] * x0.shape[0]  # the grid's columns alternate
    nrow = 2 * max(1, math.isqrt(x0.shape[0]))
    result["grid"] = save_labelled_grid(pairs, out_dir / "reconstruct.png", nrow=nrow, tags=tags)
    log.info("Wrote %s and %s", result["grid"], out_dir / "reconstruct.json")
    return result


def interpolate(cfg: DictConfig, module: Any, device: torch.device) -> dict[str, Any]:
    """Decode slerp(x_T^a, x_T^b, α) for ``num_interp`` values of α in [0, 1] with DDIM η = 0: an image strip."""
    sampler = _ddim(module, "interpolate")
    frames = int(cfg.num_interp)
    if frames < 2:
        raise ValueError(f"num_interp={frames}: expected >= 2")
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    z0, z1 = torch.randn((2, 1, *module.image_shape), generator=generator, device=device)
    latents = torch.cat([slerp(z0, z1, a) for a in torch.linspace(0, 1, frames).tolist()])
    labels = None
    if module.num_classes:
        label = int(cfg.classes[0]) if cfg.get("classes") not in (None, "all") else 0
        labels = torch.full((frames,), label, device=device)
    sampler.set_timesteps(None)
    with (
        torch.inference_mode(),
        count_forwards(module.net, sampler.num_evaluations(None), "interpolate", cfg.get("progress", True)),
    ):
        x_0 = sample_loop(module.model_fn(module.condition(labels), 0.0), sampler, latents.shape, noise=latents)
    with torch.inference_mode():
        images = module.to_images(x_0).clamp(-1, 1)  # latent diffusion decodes
    tags = [f"{a:.2f}" for a in torch.linspace(0, 1, frames).tolist()]  # α of each column
    grid = save_labelled_grid(images, Path(cfg.out_dir) / "interpolate.png", nrow=frames, tags=tags)
    log.info("Wrote %s (%d frames)", grid, frames)
    return {"grid": grid, "frames": frames}

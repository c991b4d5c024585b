"""``python src/analytic.py ckpt=PATH [num_samples=...]``: Analytic-DPM's moment Γ_n of a checkpoint, once.

Γ_n = E_{q_n(x_n)} ||ε̂(x_n, n)||² / d  (Bao et al. 2022, eq. 9), by Monte Carlo as the authors' ``save_ms_eps``
(baofff/Analytic-DPM, cifar_imagenet_codes/interface/evaluators/ddpm_evaluator.py): the same M training images x_0
for every n of the model's T timesteps, a fresh ε per (n, x_0), x_n = q_sample(x_0, n, ε), ε̂ the network's raw
prediction (unclipped) read as ε. The paper uses M = 50,000 on CIFAR-10; here ``num_samples`` (default small: T·M
network evaluations). (n, x_0) pairs are evaluated ``batch_size`` at a time, timesteps mixed within a batch.

Writes ``<ckpt stem>.analytic.safetensors`` beside the checkpoint (or ``out``) atomically: ``gamma`` (T,) float64,
``gamma_stderr`` (T,) float64 (the MC standard error), and a JSON record in the metadata (the checkpoint, the
sha256 of the weights used, samples, seed, the data config). Sampling with ``sampler.variance_type=analytic`` reads it
(:mod:`difflab.samplers.analytic`) and refuses it for other weights.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Subset

from difflab.modules import DiffusionModule, LatentDiffusionModule, UpscalerModule, load_module
from difflab.modules.checkpoint import stored_data_module
from difflab.samplers.analytic import GAMMA_FORMAT, GAMMA_VERSION, gamma_path
from difflab.schedules import GaussianDiffusion, x0_eps_from_output
from difflab.tasks.sample import resolve_device
from difflab.utils.checkpoint_io import trusted_checkpoints
from difflab.utils.checkpoint_ref import fetch_checkpoint
from difflab.utils.hashing import state_dict_sha256
from difflab.utils.paths import atomic_write
from difflab.utils.progress import progress_iter

log = logging.getLogger(__name__)

EpsFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # (x_n (B,C,H,W), n (B,), condition) → ε̂


def check_model(module: Any, where: str) -> None:
    """Analytic-DPM applies to fixed-variance models of the discrete Gaussian chain on images in [−1, 1]."""
    process = getattr(getattr(module, "diffusion", None), "process_kind", "gaussian")
    if not isinstance(module, DiffusionModule):
        raise ValueError(f"{where}: a {type(module).__name__} checkpoint is not a diffusion model")
    if process != "gaussian" or not isinstance(module.diffusion, GaussianDiffusion):
        raise ValueError(
            f"{where}: a {process}-process model ({type(module).__name__}, {type(module.diffusion).__name__}); "
            "Analytic-DPM's optimal variance is that of the discrete Gaussian (DDPM) chain's reverse steps"
        )
    if module.variance_type.learned:
        raise ValueError(
            f"{where}: model.variance_type={module.variance_type.value} samples with its own learned Σ_θ; "
            "Analytic-DPM replaces a fixed variance (fixed_small / fixed_large models)"
        )
    if isinstance(module, (LatentDiffusionModule, UpscalerModule)):
        raise ValueError(
            f"{where}: {type(module).__name__} is not supported: Theorem 2's bounds and the last-step clip assume "
            "unconditioned images in [-1, 1] (latents are unbounded; an upscaler's ε̂ needs its low-resolution input)"
        )


def model_eps(module: DiffusionModule) -> EpsFn:
    """ε̂(x_n, n, condition) of the module's network (any parameterisation), unguided, unclipped, fp32."""

    def eps(x_n: torch.Tensor, n: torch.Tensor, condition: Any) -> torch.Tensor:
        output = module.model_fn(condition, 0.0)(x_n, n)
        mean_output, _ = module.diffusion.split_output(output, module.variance_type)
        level = module.diffusion.noise_level(n, x_n)
        return x0_eps_from_output(module.parameterization, mean_output.float(), x_n.float(), level, False)[1]

    return eps


@torch.no_grad()
def estimate_gamma(
    eps_fn: EpsFn,
    diffusion: GaussianDiffusion,
    x_start: torch.Tensor,
    condition: torch.Tensor | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Γ, its standard error), both (T,) float64, from the M images ``x_start`` (M, C, H, W) at every n.

    Pair j of the T·M pairs is (n = j // M, x_0 = x_start[j % M]) with its own ε (drawn on the CPU from
    ``generator``, in pair order); ``condition`` (M,) goes with its image (class labels) or is None."""
    T, M = diffusion.num_timesteps, x_start.shape[0]
    sums = torch.zeros(T, dtype=torch.float64)
    squares = torch.zeros(T, dtype=torch.float64)
    starts = range(0, T * M, batch_size)
    for start in progress_iter(starts, len(starts), "Γ_n (Analytic-DPM)", "batch", progress):
        pairs = torch.arange(start, min(start + batch_size, T * M))
        n, m = pairs // M, pairs % M
        x_0 = x_start[m.to(x_start.device)]
        noise = torch.randn(x_0.shape, generator=generator, dtype=torch.float32).to(x_0.device, x_0.dtype)
        n_dev = n.to(x_0.device)
        x_n = diffusion.q_sample(x_0, n_dev, noise)
        eps = eps_fn(x_n, n_dev, None if condition is None else condition[m.to(condition.device)])
        value = eps.double().pow(2).flatten(1).mean(1).cpu()  # ||ε̂||²/d per pair
        sums.index_add_(0, n, value)
        squares.index_add_(0, n, value**2)
    gamma = sums / M
    variance = (squares / M - gamma**2).clamp(min=0.0) * M / max(M - 1, 1)
    return gamma, (variance / M).sqrt()


def training_images(record: dict[str, Any], where: str, cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``num_samples`` images (M, C, H, W) and labels (M,) of the run's training split, a seeded random subset (all
    of it when M is larger), and the data config."""
    datamodule, data_cfg = stored_data_module(record, where, cfg.get("data_dir"))
    datamodule.setup("fit")
    dataset = datamodule.train
    count = min(int(cfg.num_samples), len(dataset))
    if count < int(cfg.num_samples):
        log.warning("num_samples=%d: the training split has only %d images; using them all", cfg.num_samples, count)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(cfg.seed)))[:count]
    images, labels = [], []
    for x, y in DataLoader(Subset(dataset, order.tolist()), batch_size=int(cfg.batch_size)):
        images.append(x.float())
        labels.append(torch.as_tensor(y))
    return torch.cat(images), torch.cat(labels), data_cfg


def write_gamma(path: Path, gamma: torch.Tensor, stderr: torch.Tensor, info: dict[str, Any]) -> Path:
    """The Γ file: safetensors (tensors + string metadata, no pickle), written through a temporary file and
    ``os.replace`` (:func:`atomic_write`)."""
    metadata = {"format": GAMMA_FORMAT, "version": str(GAMMA_VERSION), "info": json.dumps(info, default=str)}
    tensors = {"gamma": gamma.double().contiguous(), "gamma_stderr": stderr.double().contiguous()}
    blob = safetensors.torch.save(tensors, metadata)
    with atomic_write(path) as file:
        file.write(blob)
    return path


def _check_settings(cfg: DictConfig) -> None:
    for key in ("num_samples", "batch_size"):
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}={value!r}: expected an integer >= 1")


def analytic(cfg: DictConfig) -> dict[str, Any]:
    """Estimate Γ of ``cfg.ckpt`` and write it; returns ``path``, ``gamma``, ``gamma_stderr`` and ``info``."""
    _check_settings(cfg)
    device, where = resolve_device(str(cfg.get("device", "auto"))), f"ckpt={str(cfg.ckpt)!r}"
    weights = cfg.get("weights") or "ema"
    with trusted_checkpoints(bool(cfg.get("trust_checkpoint", False))):
        ckpt = fetch_checkpoint(str(cfg.ckpt))
        module, record = load_module(ckpt, map_location=device, weights=weights)
    check_model(module, where)
    torch.manual_seed(int(cfg.seed))  # a data set's own random transforms (flips), if any
    images, labels, data_cfg = training_images(record, where, cfg)
    condition = module.condition(labels.to(device)) if module.conditional else None
    generator = torch.Generator().manual_seed(int(cfg.seed))
    start = time.perf_counter()
    gamma, stderr = estimate_gamma(
        model_eps(module), module.diffusion, images.to(device), condition, int(cfg.batch_size), generator,
        bool(cfg.get("progress", True)),
    )  # fmt: skip
    info = {
        "ckpt": str(Path(ckpt).resolve()),
        "weights": weights,
        "weights_sha256": state_dict_sha256(module.net),
        "global_step": record["global_step"],
        "num_timesteps": module.diffusion.num_timesteps,
        "parameterization": module.parameterization.value,
        "num_samples": int(images.shape[0]),
        "batch_size": int(cfg.batch_size),
        "seed": int(cfg.seed),
        "conditional": bool(module.conditional),
        "data": data_cfg,
        "split": "train",
        "seconds": round(time.perf_counter() - start, 3),
    }
    out = Path(cfg.out).expanduser() if cfg.get("out") else gamma_path(ckpt)
    write_gamma(out, gamma, stderr, info)
    log.info(
        "Γ_n of %s (%d images per n, %.1f s; max MC stderr %.2g): %s. Sample with it: python src/sample.py ckpt=%s "
        "sampler=ddpm sampler.variance_type=analytic sampler.steps=10",
        ckpt, info["num_samples"], info["seconds"], float(stderr.max()), out, ckpt,
    )  # fmt: skip
    return {"path": str(out), "gamma": gamma, "gamma_stderr": stderr, "info": info}

"""Evaluation of a checkpoint: FID / KID / IS on a named feature network, the NLL in bits/dim, the straightness of a
flow, and SSIM / PSNR / LPIPS of reconstructions (an autoencoder's, or a diffusion model's DDIM inversion)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from difflab.callbacks.nll import check_likelihood
from difflab.metrics import GenerativeMetrics, straightness
from difflab.metrics.reconstruction import RECONSTRUCTION_METRICS, ReconstructionMetrics, lpips_unavailable
from difflab.modules.checkpoint import stored_data_module
from difflab.samplers import DDIMSampler
from difflab.tasks.sample import load_for_sampling, resolve_device
from difflab.tasks.sample_info import guidance_info
from difflab.utils.checkpoint_io import trusted_checkpoints
from difflab.utils.checkpoint_ref import fetch_checkpoint
from difflab.utils.paths import check_writable, write_text_atomic
from difflab.utils.progress import SamplingProgress, progress_iter

log = logging.getLogger(__name__)

GENERATIVE = ("fid", "kid", "is")
METRICS = (*GENERATIVE, "nll", "ode_nll", "straightness", *RECONSTRUCTION_METRICS)


def _dataset(cfg: DictConfig, record: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    datamodule, data_cfg = stored_data_module(record, f"ckpt={str(cfg.ckpt)!r}", cfg.get("data_dir"))
    datamodule.setup("fit" if cfg.split in ("train", "val") else "test")
    dataset = getattr(datamodule, cfg.split, None)
    if dataset is None:
        raise ValueError(f"split={cfg.split!r}: expected train, val or test")
    return dataset, data_cfg


def generative(cfg: DictConfig, module: Any, dataset: Any, data_cfg: dict[str, Any], names: list[str]) -> dict:
    metrics = GenerativeMetrics(
        names, cfg.feature_net, cfg.get("inception_weights"), kid_subset_size=min(100, cfg.num_samples, cfg.num_real)
    ).to(module.device)
    shown = cfg.get("progress", True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size)
    total = min(len(loader), -(-int(cfg.num_real) // int(cfg.batch_size)))
    batches = (x for x, _ in progress_iter(loader, total, "real-image features", "batch", shown))
    cached = metrics.fill_real(batches, cfg.num_real, {"data": data_cfg, "split": cfg.split}, cfg.get("cache_dir"))
    log.info("Real statistics of %d %s images %s", cfg.num_real, cfg.split, "from the cache" if cached else "computed")
    generator = torch.Generator(device=module.device).manual_seed(int(cfg.seed))
    starts = range(0, cfg.num_samples, cfg.batch_size)
    bar = SamplingProgress.for_sampler(module.sampler, len(starts), shown, "sampling for metrics")
    for start in starts:
        n = min(cfg.batch_size, cfg.num_samples - start)
        metrics.update_fake(
            module.sample(n, generator=generator, guidance_scale=cfg.get("guidance_scale"), progress=bar)
        )
    bar.close()
    return metrics.compute()


def nll(cfg: DictConfig, module: Any, dataset: Any) -> dict[str, float]:
    check_likelihood(module, "metrics=[nll]")
    generator = torch.Generator(device=module.device).manual_seed(int(cfg.seed))
    sums: dict[str, float] = {}
    count = 0
    loader = DataLoader(dataset, batch_size=cfg.batch_size)
    total = min(len(loader), -(-int(cfg.nll_images) // int(cfg.batch_size)))
    for x, y in progress_iter(loader, total, "NLL", "batch", cfg.get("progress", True)):
        x = x[: cfg.nll_images - count].to(module.device)
        result = module.nll(x, y[: x.shape[0]].to(module.device) if module.num_classes else None, generator)
        for key in ("total_bpd", "prior_bpd", "decoder_bpd"):
            sums[key] = sums.get(key, 0.0) + float(result[key].sum())
        count += x.shape[0]
        if count >= cfg.nll_images:
            break
    return {f"nll_{k}": v / count for k, v in sums.items()} | {"nll_images": count}


def ode_nll(cfg: DictConfig, module: Any, dataset: Any) -> dict[str, float]:
    """Bits/dim of the first ``ode_nll_images`` images of the split from the probability-flow ODE (dequantised,
    Hutchinson–Skilling), with its standard error over the images, the solver's tolerances and mean NFE per batch."""
    if not hasattr(module, "ode_nll"):
        raise ValueError(f"metrics=[ode_nll]: {type(module).__name__} has no probability-flow ODE")
    generator = torch.Generator(device=module.device).manual_seed(int(cfg.seed))
    rtol, atol = float(cfg.ode_nll_rtol), float(cfg.ode_nll_atol)
    values, nfes, count, limit = [], [], 0, int(cfg.ode_nll_images)
    loader = DataLoader(dataset, batch_size=cfg.batch_size)
    total = min(len(loader), -(-limit // int(cfg.batch_size)))
    for x, y in progress_iter(loader, total, "ODE NLL", "batch", cfg.get("progress", True)):
        x = x[: limit - count].to(module.device)
        labels = y[: x.shape[0]].to(module.device) if module.num_classes else None
        bpd, nfe = module.ode_nll(x, labels, generator, rtol=rtol, atol=atol, estimator=cfg.ode_nll_estimator)
        values.append(bpd.detach().double().cpu())
        nfes.append(nfe)
        count += x.shape[0]
        if count >= limit:
            break
    bpd = torch.cat(values)
    error = float(bpd.std() / bpd.numel() ** 0.5) if bpd.numel() > 1 else float("nan")
    return {
        "ode_nll_bpd": float(bpd.mean()),
        "ode_nll_bpd_se": error,
        "ode_nll_nfe": sum(nfes) / len(nfes),
        "ode_nll_rtol": rtol,
        "ode_nll_atol": atol,
        "ode_nll_images": bpd.numel(),
    }


def reconstruction(cfg: DictConfig, module: Any, dataset: Any, names: list[str]) -> tuple[dict[str, Any], str]:
    """SSIM / PSNR / LPIPS of the first ``reconstruct_images`` images of the split against their reconstructions:
    an autoencoder's decode(encode(x)), a diffusion model's DDIM encode-decode (η = 0; the sampler given when it is
    DDIM with η = 0, else 50 steps on the model's schedule), as ``sample.py mode=reconstruct`` measures it.
    Returns (the values, how the images were reconstructed)."""
    metrics = ReconstructionMetrics(cfg.lpips_net if "lpips" in names else None).to(module.device)
    sampler = None
    if hasattr(module, "sample"):  # a diffusion model: DDIM inversion, with the sampler given or the default one
        sampler = module.sampler if isinstance(module.sampler, DDIMSampler) else module.reconstruction_sampler()
        if not sampler.deterministic:
            raise ValueError("metrics=[ssim,psnr,lpips] of a diffusion model: its DDIM inversion needs sampler.eta=0")
        sampler.clip_denoised = False  # clipping x̂_0 would break the invertibility of the η = 0 map
    count, limit = 0, int(cfg.reconstruct_images)
    loader = DataLoader(dataset, batch_size=cfg.batch_size)
    total = min(len(loader), -(-limit // int(cfg.batch_size)))
    for x, y in progress_iter(loader, total, "reconstruction", "batch", cfg.get("progress", True)):
        x, y = x[: limit - count].to(module.device), y[: limit - count].to(module.device)
        with torch.inference_mode():
            if sampler is not None:
                x_hat = module.reconstruct(x, y if module.num_classes else None, sampler)
            else:
                x_hat = module.reconstruct(x)
        metrics.update(x_hat.clamp(-1, 1), x)
        count += x.shape[0]
        if count >= limit:
            break
    how = "autoencoder" if sampler is None else f"ddim inversion, {sampler.num_steps} steps"
    return metrics.compute() | {"reconstruct_images": count}, how


def check_metrics(cfg: DictConfig, names: list[str]) -> None:
    """Unknown metric names, and LPIPS without its backbone weights, are errors before anything is loaded."""
    unknown = set(names) - set(METRICS)
    if unknown:
        raise ValueError(f"metrics={names}: unknown {sorted(unknown)}; expected {', '.join(METRICS)}")
    if "lpips" in names and (reason := lpips_unavailable(str(cfg.lpips_net))):
        raise ValueError(f"metrics=[...,lpips]: {reason} (or leave lpips out)")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Compute ``cfg.metrics`` for ``cfg.ckpt``; write ``<ckpt stem>_eval.json`` beside it and print a table."""
    names = [str(m).lower() for m in cfg.metrics]
    check_metrics(cfg, names)
    ckpt = Path(fetch_checkpoint(str(cfg.ckpt)))  # a wandb:... artifact: its downloaded file
    out = Path(cfg.get("out") or ckpt.with_name(f"{ckpt.stem}_eval.json"))
    check_writable(out.parent, "out")  # before minutes of sampling, not after
    if set(names) & {"fid", "kid"} and cfg.get("cache_dir"):
        check_writable(cfg.cache_dir, "cache_dir")
    device = resolve_device(cfg.device)
    module, record = load_for_sampling(cfg, device)
    dataset, data_cfg = _dataset(cfg, record)
    if not hasattr(module, "sample") and set(names) - set(RECONSTRUCTION_METRICS):
        raise ValueError(
            f"metrics={names}: ckpt={str(cfg.ckpt)!r} is a {type(module).__name__}, which does not sample; its "
            f"metrics are {', '.join(RECONSTRUCTION_METRICS)} (metrics=[ssim,psnr])"
        )
    results: dict[str, Any] = {}
    if set(names) & set(GENERATIVE):
        with trusted_checkpoints(cfg.get("trust_checkpoint", False)):  # the feature net's weights file
            results.update(generative(cfg, module, dataset, data_cfg, [n for n in names if n in GENERATIVE]))
    if "nll" in names:
        results.update(nll(cfg, module, dataset))
    if "ode_nll" in names:
        results.update(ode_nll(cfg, module, dataset))
    reconstructed = None
    if set(names) & set(RECONSTRUCTION_METRICS):
        values, reconstructed = reconstruction(cfg, module, dataset, names)
        results.update(values)
    if "straightness" in names:  # rectified flows: Liu et al.'s S over straightness_steps Euler steps
        generator = torch.Generator(device=module.device).manual_seed(int(cfg.seed))
        steps = int(cfg.get("straightness_steps", 100))
        results.update(straightness(module, int(cfg.num_samples), steps, generator, cfg.get("guidance_scale")))
    sampler = record.get("sampler")  # as load_module built it (an autoencoder has none)
    report = {
        "ckpt": str(cfg.ckpt),
        "global_step": record["global_step"],
        "num_samples": cfg.num_samples,
        "num_real": cfg.num_real,
        "split": cfg.split,
        "feature_net": cfg.feature_net,
        "weights": cfg.get("weights") or "ema",
        "sampler": sampler,
        "reconstruction": reconstructed,
        **guidance_info(cfg, module),
        "results": results,
        # the whole command's config: eval writes no run dir (conf/eval.yaml), so the report is the record
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    # the table first: a failed write (a full disk, a read-only folder) must not lose minutes of results
    print(f"{'metric':<28} value\n" + "\n".join(f"{k:<28} {v:.4f}" for k, v in results.items()), flush=True)
    write_text_atomic(out, json.dumps(report, indent=2, default=str))  # whole or not at all
    print(f"wrote {out}")
    return report

"""Latent diffusion study: stage-1 reconstructions (kl-f4 vs vq-f4) and LDM vs pixel-space DDPM at equal training time.

    python experiments/ldm/run.py --scale cpu --stage ae        # train + evaluate both autoencoders
    python experiments/ldm/run.py --scale cpu --stage compare   # DDPM vs LDM, same wall-clock budget, FID + speed
    python experiments/ldm/run.py --scale cpu --stage floor     # FID of the autoencoder's reconstructions
    python experiments/ldm/run.py --scale gpu ...                # the same on a GPU (longer budgets)

Results go to experiments/ldm/results_<scale>.json; RESULTS.md quotes them. Training runs land in logs/ldm/<scale>/.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from difflab.modules import load_autoencoder, read_run_record  # noqa: E402
from difflab.samplers import DDIMSampler  # noqa: E402
from difflab.utils.config import register_resolvers  # noqa: E402
from difflab.utils.images import save_grid  # noqa: E402
from experiments.common import (  # noqa: E402
    ROOT,
    ensure_checkpoint,
    hardware,
    load,
    markdown_table,
    real_metrics,
    record_test_set,
    write_json,
)

OUT = Path(__file__).resolve().parent
# CPU: 1500 batches of 32 without the GAN phase (disc_start = the run length): on 2 cores a GAN phase long enough
# to help does not fit (see RESULTS.md for what 300 GAN batches did).
AE = {
    "cpu": [
        "trainer=cpu",
        "data.batch_size=32",
        "trainer.max_steps=1500",
        "model.loss.disc_start=1500",
        "trainer.val_check_interval=500",
        "trainer.enable_progress_bar=false",
    ],
    "gpu": ["trainer=gpu", "trainer.enable_progress_bar=false"],
}
# DDPM in pixel space (32x32) and LDM on kl-f4 latents (8x8x3), both unconditional, same optimiser and time budget.
COMMON = {
    "cpu": [
        "data=fashion_mnist",
        "trainer=cpu",
        "data.batch_size=64",
        "+trainer.max_time=00:00:12:00",
        "trainer.val_check_interval=null",
        "trainer.limit_val_batches=2",
        "callbacks.model_checkpoint.every_n_train_steps=200",  # and a final save when max_time stops the run
        "callbacks.model_checkpoint.every_n_epochs=null",
        "callbacks.sample_grid=null",
        "callbacks.ema.decay=0.995",
        "callbacks.ema.warmup=false",  # as the recorded runs
        "model.optimizer.lr=1e-3",
        "model.lr_scheduler.warmup_steps=100",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "samples.num_samples=0",  # the evaluation draws (and saves) DDIM samples
    ],
    "gpu": [
        "data=fashion_mnist",
        "trainer=gpu",
        "+trainer.max_time=00:00:10:00",
        "callbacks.model_checkpoint.every_n_train_steps=250",
        "callbacks.model_checkpoint.every_n_epochs=null",
        "callbacks.sample_grid=null",
        "callbacks.ema.decay=0.999",
        "callbacks.ema.warmup=false",
        "model.lr_scheduler.warmup_steps=500",
        "trainer.enable_progress_bar=false",
        "logger=csv",
    ],
}
MODELS = {
    "ddpm_pixel": ["model=ddpm", "net=unet_s"],
    "ldm_kl_f4": ["model=ldm", "model.conditioner=null"],
}
EVAL = {
    "cpu": {"num_samples": 300, "num_real": 1000, "steps": 50},
    "gpu": {"num_samples": 10000, "num_real": 10000, "steps": 50},
}


def evaluate_autoencoder(ckpt: Path, device: torch.device) -> dict:
    """PSNR / SSIM of deterministic reconstructions (posterior mean / codebook) on the whole test split; VQ codebook
    usage and perplexity there."""
    from hydra.utils import instantiate
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    ae, config = load_autoencoder(ckpt)
    ae.to(device)
    register_resolvers()
    datamodule = instantiate(config["data"])
    datamodule.setup("test")
    psnr = PeakSignalNoiseRatio(data_range=2.0).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=2.0).to(device)
    counts = torch.zeros(ae.quantizer.n_embed if ae.quantizer else 1)
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(datamodule.test, batch_size=500):
            x = x.to(device)
            z = ae.encode(x, sample=False)
            if ae.quantizer is not None:
                counts += torch.bincount(ae.quantizer.lookup(z).flatten().cpu(), minlength=len(counts))
            x_hat = ae.decode(z).clamp(-1, 1)
            psnr.update(x_hat, x)
            ssim.update(x_hat, x)
    row = {
        "psnr": float(psnr.compute()),
        "ssim": float(ssim.compute()),
        "test_images": len(datamodule.test),
        "latent_shape": list(ae.latent_shape),
        "params": sum(p.numel() for p in ae.parameters()),
        "checkpoint": str(ckpt.relative_to(ROOT)),
    }
    if ae.quantizer is not None:
        probs = counts / counts.sum()
        row["codebook_usage"] = float((counts > 0).float().mean())
        row["codebook_perplexity"] = float(torch.exp(-(probs * torch.log(probs + 1e-10)).sum()))
    return row


def ae_stage(scale: str, device: torch.device) -> dict:
    rows = {}
    for name in ("kl_f4", "vq_f4"):
        ckpt = ensure_checkpoint(
            ROOT / "logs" / "ldm" / scale / f"ae_{name}", [f"experiment=autoencoder_{name}", *AE[scale]]
        )
        rows[name] = evaluate_autoencoder(ckpt, device)
        print(name, rows[name], flush=True)
    return rows


def throughput(module, batch: torch.Tensor, steps: int, sample_steps: int) -> dict:
    """Training images/s (forward, backward, Adam step) and sampling image-steps/s (DDIM, decode included)."""
    module.train()
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    y = torch.zeros(batch.shape[0], dtype=torch.long, device=batch.device)
    module.log = lambda *a, **k: None  # not attached to a Trainer

    def step() -> None:
        opt.zero_grad()
        module.training_step((batch, y), 0).backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    train_ips = steps * batch.shape[0] / (time.perf_counter() - start)
    module.eval()
    sampler = module.build_sampler(functools.partial(DDIMSampler, steps=sample_steps, eta=0.0))
    n = batch.shape[0]
    start = time.perf_counter()
    module.sample(n, generator=torch.Generator(batch.device).manual_seed(0), sampler=sampler)
    return {
        "train_images_per_s": train_ips,
        "sample_image_steps_per_s": n * sample_steps / (time.perf_counter() - start),
    }


def compare_stage(scale: str, device: torch.device) -> dict:
    ae_ckpt = ROOT / "logs" / "ldm" / scale / "ae_kl_f4" / "checkpoints" / "last.ckpt"
    rows, jobs = {}, {}
    for name, overrides in MODELS.items():  # both trainings side by side: the same machine share and wall clock
        run_dir = ROOT / "logs" / "ldm" / scale / name
        if not (run_dir / "checkpoints" / "last.ckpt").is_file():
            extra = [f"model.autoencoder_ckpt={ae_ckpt}"] if name.startswith("ldm") else []
            cmd = [sys.executable, str(ROOT / "src" / "train.py"), *COMMON[scale], *overrides, *extra]
            print("+", " ".join(cmd), flush=True)
            # one thread each on a CPU, so the two runs share the machine evenly
            env = {**os.environ, "OMP_NUM_THREADS": "1"} if scale == "cpu" else None
            jobs[name] = subprocess.Popen([*cmd, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env)
    if any(job.wait() for job in jobs.values()):
        raise RuntimeError("a training run failed")
    for name in MODELS:
        ckpt = ROOT / "logs" / "ldm" / scale / name / "checkpoints" / "last.ckpt"
        module, record, test = load(ckpt, device)
        cfg = EVAL[scale]
        gm = real_metrics(
            test, cfg["num_real"], ("fid", "kid"), "fmnist_cls", device, {"data": record["config"]["data"]}
        )
        module.sample_batch_size = 250
        sampler = module.build_sampler(functools.partial(DDIMSampler, steps=cfg["steps"], eta=0.0))
        start = time.perf_counter()
        samples = module.sample(cfg["num_samples"], torch.Generator(device).manual_seed(0), sampler=sampler)
        seconds = time.perf_counter() - start
        gm.update_fake(samples)
        save_grid(samples[:64], OUT / f"samples_{scale}_{name}.png", nrow=8)
        row = {
            **gm.compute(),
            "global_step": record["global_step"],
            "sample_seconds": seconds,
            "params": sum(p.numel() for p in module.net.parameters()),
        }
        batch = next(iter(torch.utils.data.DataLoader(test, batch_size=64)))[0].to(device)
        row.update(throughput(module, batch, steps=5 if device.type == "cpu" else 50, sample_steps=20))
        print(name, row, flush=True)
        rows[name] = row
    return rows


def floor_stage(scale: str, device: torch.device) -> dict:
    """FID of the kl-f4 autoencoder's own reconstructions: the floor a latent diffusion model on it can reach."""
    ae_ckpt = ROOT / "logs" / "ldm" / scale / "ae_kl_f4" / "checkpoints" / "last.ckpt"
    record = read_run_record(ROOT / "logs" / "ldm" / scale / "ldm_kl_f4" / "checkpoints" / "last.ckpt")
    test = record_test_set(record)  # the LDM run's data; the module itself is not needed here
    autoencoder, _ = load_autoencoder(ae_ckpt)
    autoencoder.to(device)
    cfg = EVAL[scale]
    gm = real_metrics(test, cfg["num_real"], ("fid", "kid"), "fmnist_cls", device, {"data": record["config"]["data"]})
    # images disjoint from the num_real reference ones: the last num_samples of the test split
    subset = torch.utils.data.Subset(test, range(len(test) - cfg["num_samples"], len(test)))
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(subset, batch_size=250):
            x = x.to(device)
            gm.update_fake(autoencoder.decode(autoencoder.encode(x, sample=False)).clamp(-1, 1))
    row = gm.compute()
    print("ae_kl_f4_reconstructions", row, flush=True)
    return {"ae_kl_f4_reconstructions": row}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--stage", choices=["ae", "compare", "floor", "all"], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    path = OUT / f"results_{args.scale}.json"
    import json

    results = json.loads(path.read_text()) if path.is_file() else {}
    results["hardware"] = hardware()
    if args.stage in ("ae", "all"):
        results["autoencoders"] = ae_stage(args.scale, device)
        write_json(path, results)
    if args.stage in ("compare", "all"):
        results["compare"] = compare_stage(args.scale, device)
        write_json(path, results)
    if args.stage in ("floor", "all"):
        results["compare"].update(floor_stage(args.scale, device))
        write_json(path, results)
    for key, header in (
        ("autoencoders", ["psnr", "ssim"]),
        ("compare", ["fid_fmnist_cls", "train_images_per_s", "sample_image_steps_per_s"]),
    ):
        if key in results:
            print(markdown_table(["run", *header], [[k, *[v.get(h) for h in header]] for k, v in results[key].items()]))


if __name__ == "__main__":
    main()

"""Improved DDPM study: L_simple (fixed variance) vs L_hybrid (learned variance) on the same data and budget.

    python experiments/iddpm_nll/run.py --scale cpu     # the scaled-down CPU run (16x16, unet_s, ~20 min)
    python experiments/iddpm_nll/run.py --scale gpu_short   # 4-minute GPU models (experiments/gpu_short.sh)
    python experiments/iddpm_nll/run.py --scale gpu     # the real one (32x32, unet_m, trainer=gpu)

Stage 1 trains both models with src/train.py (same seed, data, steps, schedule=cosine). Stage 2 evaluates
each: test NLL in bits/dim (full chain, with its prior term L_T and decoder term L_0 reported separately; the
fixed-variance model with both σ² = β̃ and σ² = β), and samples at 50 and 1000 ancestral steps saved as .npz.
Stage 3 (`--fid`) computes the FID proxy of the samples with the metrics issue's feature net when it exists.
Everything lands in logs/iddpm_nll/ (not committed) and the table in experiments/iddpm_nll/RESULTS.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from experiments.common import PRESETS, sampling_precision  # noqa: E402

OUT = ROOT / "logs" / "iddpm_nll"
SCALES = {
    # the `make train` setup (16x16 Fashion-MNIST, unet_s, CPU), trained a little longer
    "cpu": ["experiment=quickstart", "trainer.max_steps=1500", "callbacks.ema.warmup=false"],  # EMA as recorded
    "gpu_short": PRESETS["gpu_short"],
    "smoke": PRESETS["smoke"],
    "gpu": [
        "data=fashion_mnist",
        "net=unet_m",
        "trainer=gpu",
        "trainer.max_steps=100000",
        "callbacks.ema.decay=0.9999",
    ],
}
MODELS = {"simple": ["model=ddpm"], "hybrid": ["model=iddpm"]}
EVAL = {
    "cpu": {"nll_images": 128, "samples": 256, "fid_real": 1000},
    "smoke": {"nll_images": 8, "samples": 40, "fid_real": 200},
    "gpu_short": {"nll_images": 256, "samples": 500, "fid_real": 10000},
    "gpu": {"nll_images": 10000, "samples": 10000, "fid_real": 10000},
}


def train(scale: str, only: list[str], extra: list[str]) -> dict[str, Path]:
    ckpts = {}
    for name in only:
        overrides = MODELS[name]
        run_dir = OUT / scale / name
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            cmd = [
                sys.executable,
                str(ROOT / "src" / "train.py"),
                *SCALES[scale],
                *overrides,
                *extra,
                "schedule=cosine",
                "task_name=iddpm_nll",
                f"hydra.run.dir={run_dir}",
            ]
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
        ckpts[name] = ckpt
    return ckpts


def test_images(record: dict, n: int) -> torch.Tensor:
    from hydra.utils import instantiate

    datamodule = instantiate(record["config"]["data"])
    datamodule.setup("test")
    images = [x for x, _ in datamodule.test_dataloader()]
    return torch.cat(images)[:n]


def test_nll(module, x: torch.Tensor) -> dict[str, float]:
    """Mean full-chain NLL terms (bits/dim) of ``x`` (fixed noise per chunk of 256), and the seconds it took."""
    start = time.time()
    nll = [
        module.nll(chunk, generator=torch.Generator(x.device).manual_seed(i)) for i, chunk in enumerate(x.split(256))
    ]
    row = {
        key: torch.cat([r[key] for r in nll]).mean().item()
        for key in ("total_bpd", "prior_bpd", "decoder_bpd", "terms_bpd")
    }
    row["nll_seconds"] = round(time.time() - start, 1)
    return row


def evaluate(
    ckpt: Path, name: str, scale: str, device: torch.device, sample_steps: list[int], nll_images: int, num_samples: int
) -> list[dict]:
    from difflab.modules import load_module
    from difflab.schedules import VarianceType
    from difflab.utils.images import save_npz

    module, record = load_module(ckpt, map_location=device)
    module.sample_batch_size = 1000 if device.type == "cuda" else 256
    x = test_images(record, nll_images).to(device)
    variants = (
        [module.variance_type] if module.variance_type.learned else [VarianceType.FIXED_SMALL, VarianceType.FIXED_LARGE]
    )
    rows = []
    for variance in variants:
        module.variance_type = variance
        sampler = module.build_sampler(lambda **kw: type(module.sampler)(**kw))
        row = {"model": name, "variance": variance.value, "step": record["global_step"]}
        if nll_images:
            row.update(test_nll(module, x))
        for steps in sample_steps:
            with sampling_precision(device):
                samples = module.sample(
                    num_samples,
                    generator=torch.Generator(device).manual_seed(0),
                    sampler=sampler,
                    num_steps=steps,
                )
            path = OUT / scale / "samples" / f"{name}_{variance.value}_{steps}.npz"
            save_npz(samples, path)
            row[f"samples_{steps}"] = str(path.relative_to(ROOT))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def fid_stage(scale: str, device: torch.device) -> None:
    """Add the FID proxy (fid_fmnist_cls, vs the scale's ``fid_real`` test images) of each sample set to the results."""
    import numpy as np

    from experiments.common import load, real_metrics

    num_real = EVAL[scale]["fid_real"]
    path = Path(__file__).with_name(f"RESULTS_{scale}.json")
    result = json.loads(path.read_text())
    _, record, test = load(OUT / scale / "simple" / "checkpoints" / "last.ckpt", device)
    gm = real_metrics(test, num_real, ("fid",), "fmnist_cls", device, {"data": record["config"]["data"]})
    for row in result["rows"]:
        for steps in (s for s in (50, 1000) if f"samples_{s}" in row):
            images = np.load(ROOT / row[f"samples_{steps}"])["arr_0"]  # (N, H, W, C) uint8
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1
            gm.update_fake(x)
            row[f"fid_fmnist_cls_{steps}"] = gm.compute()["fid_fmnist_cls"]
        print(json.dumps(row), flush=True)
    result["fid"] = {"feature_net": "fmnist_cls", "num_real": num_real, "split": "test"}
    path.write_text(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fid", action="store_true", help="only add the FID proxy to an existing RESULTS json")
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), default=list(MODELS), help="models to train")
    parser.add_argument("--train-only", action="store_true", help="stop after training (models side by side)")
    parser.add_argument("--train-extra", nargs="*", default=[], help="more src/train.py overrides")
    parser.add_argument(
        "--nll-images", type=int, default=None, help="test images for the NLL (0: skip; default by scale)"
    )
    parser.add_argument("--sample-steps", type=int, nargs="*", choices=[50, 1000], default=[50, 1000])
    parser.add_argument("--num-samples", type=int, default=None, help="samples per cell (default: by scale)")
    args = parser.parse_args(argv)
    if args.fid:
        fid_stage(args.scale, torch.device(args.device))
        return
    ckpts = train(args.scale, args.only, args.train_extra)
    if args.train_only:
        return
    device = torch.device(args.device)
    nll_images = EVAL[args.scale]["nll_images"] if args.nll_images is None else args.nll_images
    num_samples = EVAL[args.scale]["samples"] if args.num_samples is None else args.num_samples
    rows = [
        row
        for name, ckpt in ckpts.items()
        for row in evaluate(ckpt, name, args.scale, device, args.sample_steps, nll_images, num_samples)
    ]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    result = {
        "scale": args.scale,
        "device": device_name,
        "torch": torch.__version__,
        "rows": rows,
        "train_overrides": SCALES[args.scale] + args.train_extra,
        "eval": {**EVAL[args.scale], "nll_images": nll_images, "samples": num_samples},
    }
    out = Path(__file__).with_name(f"RESULTS_{args.scale}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

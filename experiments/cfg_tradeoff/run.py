"""Classifier-free guidance: FID / IS / class accuracy as the guidance weight w grows (Ho & Salimans Fig. 4 shape).

    python experiments/cfg_tradeoff/run.py                  # the CPU run recorded in RESULTS.md
    python experiments/cfg_tradeoff/run.py --num-samples 10000 --train "experiment=cfg trainer=gpu"

One class-conditional model (model=cfg, p_uncond = 0.1; trained by src/train.py if missing), sampled with DDIM
(η = 0, 50 steps) for each w with balanced labels and the same noise. FID and IS use difflab's Fashion-MNIST
classifier (fid_fmnist_cls / is_fmnist_cls: offline proxies, NOT Inception numbers); the class accuracy is that
classifier's agreement with the requested labels (it never saw the diffusion model's samples in training).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.metrics import load_classifier
from difflab.samplers import DDIMSampler
from experiments.common import (
    PRESETS,
    ROOT,
    ensure_checkpoint,
    hardware,
    load,
    markdown_table,
    real_metrics,
    sampling_precision,
    write_json,
)

WEIGHTS = [0.0, 0.1, 0.3, 0.5, 1.0, 2.0, 4.0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--train",
        default="experiment=quickstart model=cfg net.use_scale_shift_norm=true "
        "trainer.max_steps=800 task_name=cfg_tradeoff callbacks.ema.warmup=false",  # EMA as recorded
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="none", help="training overrides put before --train")
    p.add_argument("--run-dir", default=str(ROOT / "logs" / "cfg_tradeoff" / "model"))
    p.add_argument("--weights", type=float, nargs="+", default=WEIGHTS)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--num-real", type=int, default=1000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ckpt = ensure_checkpoint(Path(args.run_dir), PRESETS[args.preset] + args.train.split())
    module, record, test = load(ckpt, device)
    module.sample_batch_size = 1000 if device.type == "cuda" else 250
    gm = real_metrics(test, args.num_real, ("fid", "is"), "fmnist_cls", device, {"data": record["config"]["data"]})
    classifier, meta = load_classifier("fmnist_cls")
    classifier = classifier.to(device)
    sampler = module.build_sampler(functools.partial(DDIMSampler, eta=0.0, steps=args.steps))
    labels = torch.arange(args.num_samples) % module.num_classes
    rows = []
    for w in args.weights:
        start = time.time()
        with sampling_precision(device):
            images = module.sample(
                args.num_samples, torch.Generator(device).manual_seed(0), sampler, y=labels, guidance_scale=w
            )
        gm.update_fake(images)
        values = gm.compute()
        with torch.no_grad():
            accuracy = (classifier(images).argmax(1).cpu() == labels).float().mean().item()
        rows.append(
            {
                "w": w,
                "fid_fmnist_cls": values["fid_fmnist_cls"],
                "is_fmnist_cls": values["is_fmnist_cls"],
                "class_accuracy": accuracy,
            }
        )
        print(rows[-1], f"({time.time() - start:.0f}s)", flush=True)
    out = Path(__file__).parent
    write_json(
        out / "results.json",
        {
            "rows": rows,
            "ckpt": str(ckpt),
            "global_step": record["global_step"],
            "num_samples": args.num_samples,
            "num_real": args.num_real,
            "sampler": f"DDIM eta=0, {args.steps} steps",
            "classifier_test_accuracy": meta.get("test_accuracy"),
            "hardware": hardware(),
            "train": " ".join(PRESETS[args.preset] + args.train.split()),
            "sampling_precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        },
    )
    plot(rows, out / "fid_vs_is.png")
    keys = ["w", "fid_fmnist_cls", "is_fmnist_cls", "class_accuracy"]
    print(markdown_table(keys, [[r[k] for k in keys] for r in rows]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["is_fmnist_cls"] for r in rows], [r["fid_fmnist_cls"] for r in rows], marker="o")
    for r in rows:
        ax.annotate(f"w={r['w']:g}", (r["is_fmnist_cls"], r["fid_fmnist_cls"]), fontsize=8)
    ax.set(xlabel="IS (fmnist_cls)", ylabel="FID (fmnist_cls)", title="classifier-free guidance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""Classifier guidance (Dhariwal & Nichol 2021) vs classifier-free guidance (Ho & Salimans 2022) on Fashion-MNIST:
class accuracy, FID and IS against the classifier scale s and the CFG weight w.

    python experiments/guidance_editing/classifier_guidance.py        # the CPU run of RESULTS_classifier_guidance.md
    python experiments/guidance_editing/classifier_guidance.py --device cuda --num-samples 10000 --num-real 10000 \\
        --train "experiment=cfg trainer=gpu" --classifier-train "experiment=noisy_classifier_fmnist trainer=gpu" \\
        --run-dir logs/guidance_editing/gpu

One class-conditional model (model=cfg, p_uncond = 0.1, so it is also an unconditional model under the null label)
and one noise-conditional classifier on the same schedule and image size (experiment=noisy_classifier_fmnist; both
trained by src/train.py if missing). Rows, each sampled with DDIM (η = 0, 25 steps, static clip) from the same initial
noise with balanced labels:
  cg_uncond  ε̂ = ε(x, ∅) − s sqrt(1 − ᾱ_t) ∇ log p_φ(y | x_t, t)          (ADM-G on an unconditional model)
  cg_cond    ε̂ = ε(x, y) − s sqrt(1 − ᾱ_t) ∇ log p_φ(y | x_t, t)          (ADM-G on a conditional model)
  cfg        ε̂ = (1 + w) ε(x, y) − w ε(x, ∅)                                (w = 0: the conditional model)
FID and IS use difflab's shipped Fashion-MNIST classifier (fid_fmnist_cls / is_fmnist_cls: offline proxies, NOT
Inception numbers); class accuracy is that classifier's agreement with the requested label. The shipped classifier
is not the guiding one (another network, trained on clean 32x32 images), so accuracy is not the guide grading itself.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.metrics import load_classifier  # noqa: E402
from difflab.samplers import DDIMSampler, sample_loop  # noqa: E402
from difflab.samplers.classifier_guidance import classifier_guidance  # noqa: E402
from difflab.tasks.classifier_guidance import check_compatible, load_noisy_classifier  # noqa: E402
from experiments import common  # noqa: E402

OUT = Path(__file__).parent
TRAIN = "experiment=quickstart model=cfg net.use_scale_shift_norm=true trainer.max_steps=900 task_name=guidance_editing"
CLASSIFIER_TRAIN = "experiment=noisy_classifier_fmnist data.image_size=16 logger=csv"
ROWS = {"cg_uncond": [0.0, 1.0, 3.0, 10.0, 30.0], "cg_cond": [3.0], "cfg": [0.0, 1.0, 3.0]}
# the order cells run in (results are written after each): the comparison first, the ends of the sweep last
ORDER = ["cfg:0", "cg_uncond:0", "cg_uncond:3", "cfg:1", "cg_uncond:10", "cfg:3", "cg_uncond:1", "cg_cond:3"]
ORDER += ["cg_uncond:30"]


def model_fn(module, classifier, kind: str, scale: float, labels: torch.Tensor):
    """The guided model function of one row (see the module docstring)."""
    if kind == "cfg":
        return module.model_fn(labels, scale)
    net_labels = torch.full_like(labels, module.num_classes) if kind == "cg_uncond" else labels
    unguided = functools.partial(lambda x, t, y: module(x, t, y), y=net_labels)
    return classifier_guidance(unguided, classifier, labels, scale, module.diffusion, module.parameterization)


def generate(module, classifier, sampler, kind: str, scale: float, args, device) -> tuple[torch.Tensor, float]:
    """args.num_samples images, labels 0..K−1 in turn; batch b starts from noise seeded args.seed + b."""
    labels = torch.arange(args.num_samples, device=device) % module.num_classes
    start, chunks = time.time(), []
    for b, first in enumerate(range(0, args.num_samples, args.batch_size)):
        y = labels[first : first + args.batch_size]
        g = torch.Generator(device).manual_seed(args.seed + b)
        noise = torch.randn((y.shape[0], *module.image_shape), generator=g, device=device)
        with common.sampling_precision(device), module.sampling_precision():
            x = sample_loop(model_fn(module, classifier, kind, scale, y), sampler, noise.shape, g, device, noise=noise)
        chunks.append(x.clamp(-1, 1))
    return torch.cat(chunks), time.time() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=TRAIN)
    p.add_argument("--classifier-train", default=CLASSIFIER_TRAIN)
    p.add_argument("--run-dir", default=str(common.ROOT / "logs" / "guidance_editing"))
    p.add_argument("--cells", nargs="+", default=ORDER, help="guidance:scale pairs, run in this order")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--num-real", type=int, default=1000)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT / "results_classifier_guidance.json"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    run_dir = Path(args.run_dir)
    module, record, test = common.load(common.ensure_checkpoint(run_dir / "cfg_model", args.train.split()), device)
    classifier_ckpt = common.ensure_checkpoint(run_dir / "noisy_classifier", args.classifier_train.split())
    classifier = load_noisy_classifier(str(classifier_ckpt), device)
    check_compatible(classifier, module, str(classifier_ckpt))
    gm = common.real_metrics(
        test, args.num_real, ("fid", "is"), "fmnist_cls", device, {"data": record["config"]["data"]}
    )
    judge = load_classifier("fmnist_cls")[0].to(device)
    sampler = module.build_sampler(functools.partial(DDIMSampler, eta=0.0, steps=args.steps))
    labels = torch.arange(args.num_samples) % module.num_classes
    payload: dict[str, Any] = {
        "rows": [],
        "num_samples": args.num_samples,
        "num_real": args.num_real,
        "sampler": f"DDIM eta=0, {args.steps} steps, static clip",
        "hardware": common.hardware(),
        "train": args.train,
        "classifier_train": args.classifier_train,
        "global_step": record["global_step"],
    }
    for kind, scale in ((c.split(":")[0], float(c.split(":")[1])) for c in args.cells):
        if kind not in ROWS:
            raise ValueError(f"--cells {kind}:{scale}: expected one of {list(ROWS)}")
        images, seconds = generate(module, classifier, sampler, kind, scale, args, device)
        gm.update_fake(images)
        values = gm.compute()
        with torch.no_grad():
            accuracy = (judge(images).argmax(1).cpu() == labels).float().mean().item()
        row = {"guidance": kind, "scale": scale, **{k: float(v) for k, v in values.items()}}
        row.update(class_accuracy=accuracy, seconds=round(seconds, 1))
        print(row, flush=True)
        payload["rows"].append(row)
        common.write_json(Path(args.out), payload)  # after every cell: a stopped run keeps its rows
    plot(payload["rows"], Path(args.out).with_suffix(".png"))
    keys = ["guidance", "scale", "fid_fmnist_cls", "is_fmnist_cls", "class_accuracy"]
    print(common.markdown_table(keys, [[r[k] for k in keys] for r in payload["rows"]]))


def plot(rows: list[dict], path: Path) -> None:
    """FID against class accuracy, one line per guidance kind, points labelled with s or w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for kind in dict.fromkeys(r["guidance"] for r in rows):
        sub = sorted((r for r in rows if r["guidance"] == kind), key=lambda r: r["scale"])
        ax.plot([r["class_accuracy"] for r in sub], [r["fid_fmnist_cls"] for r in sub], marker="o", label=kind)
        for r in sub:
            ax.annotate(f"{'w' if kind == 'cfg' else 's'}={r['scale']:g}", (r["class_accuracy"], r["fid_fmnist_cls"]))
    ax.set(xlabel="class accuracy (fmnist_cls)", ylabel="FID (fmnist_cls)", title="classifier vs classifier-free")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

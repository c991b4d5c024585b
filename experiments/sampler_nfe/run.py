"""FID against network evaluations (NFE) for every sampler, on one model; and DPM-Solver++(2M) under guidance.

    python experiments/sampler_nfe/run.py                  # the CPU run recorded in RESULTS.md (all three parts)
    python experiments/sampler_nfe/run.py --part nfe --num-samples 10000 --num-real 10000 --device cuda \\
        --train "data=fashion_mnist trainer=gpu model=ddpm schedule=cosine" --run-dir logs/sampler_nfe/gpu

Part ``nfe``: each sampler of conf/sampler/ with its own defaults (σ schedule, spacing, clipping) at NFE ∈ {5, 10, 15,
20, 50} (Heun's NFE counts evaluations, 2·steps − 1: the largest steps that fit), the same initial noise for every
cell (batch b starts from the generator seeded ``seed + b``). Part ``schedules``: the solvers on each σ schedule at
10 and 20 NFE (how the defaults were chosen). Part ``cfg``: a class-conditional model at guidance w = 3, DDIM with 50
steps against DPM-Solver++(2M) at 10/15/20 NFE without thresholding, with the static clip and with dynamic
thresholding. FID and IS use difflab's Fashion-MNIST classifier (fid_fmnist_cls / is_fmnist_cls: offline proxies,
NOT comparable to Inception numbers); class accuracy is that classifier's agreement with the requested labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.data.teacher_sampler import sampler_preset  # noqa: E402
from difflab.metrics import load_classifier  # noqa: E402
from experiments.common import (  # noqa: E402
    ROOT,
    ensure_checkpoint,
    hardware,
    load,
    markdown_table,
    real_metrics,
    sampling_precision,
    write_json,
)

OUT = Path(__file__).parent
SAMPLERS = [
    "ddim",
    "ddpm",
    "euler",
    "heun",
    "euler_ancestral",
    "euler_maruyama",
    "dpmpp_2m",
    "dpmpp_3m",
    "dpmpp_2m_sde",
    "unipc",
]
NFE = [5, 10, 15, 20, 50]
SCHEDULES = {  # part "schedules": σ steps of the solvers (every key set: each overrides the sampler's YAML)
    "trailing": {"sigma_schedule": "model", "spacing": "trailing", "sigma_max": None},
    "karras": {"sigma_schedule": "karras", "sigma_max": None},
    "karras_80": {"sigma_schedule": "karras", "sigma_max": 80.0},
    "uniform_lambda": {"sigma_schedule": "uniform_lambda", "sigma_max": None},
    "uniform_lambda_80": {"sigma_schedule": "uniform_lambda", "sigma_max": 80.0},
}
UNIFORM_LAMBDA = SCHEDULES["uniform_lambda"]
SCHEDULE_SAMPLERS = ["euler", "heun", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]
CFG_ROWS = [  # part "cfg": (name, sampler, overrides, NFE values)
    ("DDIM (η = 0), static clip", "ddim", {}, [50]),
    ("DDIM (η = 0), no thresholding", "ddim", {"clip_denoised": False}, [50]),
    ("DDIM (η = 0), dynamic 0.995", "ddim", {"dynamic_threshold": 0.995}, [50]),
    # the recorded DPM-Solver++ rows used uniform-λ steps (the solvers' default then; Karras-80 now)
    ("DPM-Solver++(2M), no thresholding", "dpmpp_2m", {"clip_denoised": False, **UNIFORM_LAMBDA}, [10, 15, 20]),
    ("DPM-Solver++(2M), static clip", "dpmpp_2m", UNIFORM_LAMBDA, [10, 15, 20]),
    ("DPM-Solver++(2M), dynamic 0.995", "dpmpp_2m", {"dynamic_threshold": 0.995, **UNIFORM_LAMBDA}, [10, 15, 20]),
]
# the recorded runs' EMA (no warm-up; experiment=quickstart has one since issue 22)
EMA = " callbacks.ema.warmup=false"
SIMPLE = "experiment=quickstart trainer.max_steps=1500 model=ddpm schedule=cosine" + EMA  # iddpm_nll's CPU model
CFG = "experiment=quickstart model=cfg net.use_scale_shift_norm=true trainer.max_steps=1500 task_name=sampler_nfe" + EMA


def sampler_factory(name: str, **overrides: Any):
    """conf/sampler/<name>.yaml (a partial; its ``defaults`` merged, its target allow-listed:
    :func:`difflab.data.teacher_sampler.sampler_preset`) with ``overrides``; the model completes it."""
    return instantiate(OmegaConf.merge(sampler_preset(name, key="sampler"), overrides))


def steps_for(sampler, nfe: int) -> int:
    """The most steps whose network evaluations fit in ``nfe``."""
    steps = max(s for s in range(1, nfe + 1) if sampler.num_evaluations(s) <= nfe)
    return steps


def generate(module, sampler, steps: int, num: int, batch: int, device, y=None, w=None, seed: int = 0):
    """``num`` samples in batches; batch b starts from the generator seeded seed + b (the same x_T for every sampler).
    Returns (images, seconds)."""
    start, chunks = time.time(), []
    for b, first in enumerate(range(0, num, batch)):
        n = min(batch, num - first)
        g = torch.Generator(device).manual_seed(seed + b)
        labels = None if y is None else y[first : first + n]
        with sampling_precision(device):
            chunks.append(module.sample(n, g, sampler, steps, y=labels, guidance_scale=w))
    return torch.cat(chunks), time.time() - start


def cell(module, gm, name: str, nfe: int, args, device, **overrides) -> dict[str, Any]:
    sampler = module.build_sampler(sampler_factory(name, **overrides))
    steps = steps_for(sampler, nfe)
    images, seconds = generate(module, sampler, steps, args.num_samples, args.batch_size, device, seed=args.seed)
    gm.update_fake(images)
    values = gm.compute()
    row = {"sampler": name, "target_nfe": nfe, "nfe": sampler.num_evaluations(steps), "steps": steps}
    row["seconds"] = round(seconds, 1)
    row.update({k: float(v) for k, v in values.items()}, overrides=overrides)
    print(row, flush=True)
    return row


def part_nfe(module, gm, args, device) -> list[dict]:
    return [cell(module, gm, name, nfe, args, device) for name in args.samplers for nfe in args.nfe]


def part_schedules(module, gm, args, device) -> list[dict]:
    rows = []
    for name in args.schedule_samplers:
        for tag, schedule in SCHEDULES.items():
            for nfe in args.schedule_nfe:
                rows.append(cell(module, gm, name, nfe, args, device, **schedule) | {"schedule": tag})
    return rows


def part_cfg(args, device) -> list[dict]:
    ckpt = ensure_checkpoint(Path(args.cfg_run_dir), args.cfg_train.split())
    module, record, test = load(ckpt, device)
    gm = real_metrics(test, args.num_real, ("fid", "is"), "fmnist_cls", device, {"data": record["config"]["data"]})
    classifier = load_classifier("fmnist_cls")[0].to(device)
    labels = torch.arange(args.num_samples) % module.num_classes
    rows = []
    for title, name, overrides, nfes in (
        row for row in CFG_ROWS if args.cfg_samplers is None or row[1] in args.cfg_samplers
    ):
        for nfe in nfes:
            sampler = module.build_sampler(sampler_factory(name, **overrides))
            steps = steps_for(sampler, nfe)
            images, seconds = generate(
                module, sampler, steps, args.num_samples, args.batch_size, device, labels, args.guidance, args.seed
            )
            gm.update_fake(images)
            values = gm.compute()
            with torch.no_grad():
                accuracy = (classifier(images).argmax(1).cpu() == labels).float().mean().item()
            row = {"row": title, "target_nfe": nfe, "nfe": sampler.num_evaluations(steps), "steps": steps}
            row.update({k: float(v) for k, v in values.items()}, accuracy=accuracy, seconds=round(seconds, 1))
            row["range_out"] = float((images.abs() >= 0.999).float().mean())  # saturated pixels
            print(row, flush=True)
            rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = "os^vDP*Xph"
    for k, name in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
        cells = [r for r in rows if r["sampler"] == name]
        style = {"linestyle": "--", "linewidth": 2.5} if name in ("ddim", "ddpm") else {}
        ax.plot(
            [r["nfe"] for r in cells], [r["fid_fmnist_cls"] for r in cells], marker=markers[k % 10], label=name, **style
        )
    ax.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)", ylabel="FID (fmnist_cls features)")
    ax.set_xticks([5, 10, 15, 20, 50], labels=["5", "10", "15", "20", "50"])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7, ncol=2, title="euler = ddim (same chain)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def tables(result: dict) -> None:
    if "nfe" in result:
        by = {(r["sampler"], r["target_nfe"]): r for r in result["nfe"]}
        samplers, nfe = list(dict.fromkeys(s for s, _ in by)), sorted({n for _, n in by})
        for metric in ("fid_fmnist_cls", "is_fmnist_cls"):
            rows = [[s, *(by[(s, n)][metric] if (s, n) in by else "—" for n in nfe)] for s in samplers]
            print(markdown_table([f"{metric} \\ NFE", *map(str, nfe)], rows))
    for part in ("schedules", "cfg"):
        if part in result:
            keys = [k for k in result[part][0] if k not in ("overrides",)]
            print(markdown_table(keys, [[r[k] for k in keys] for r in result[part]]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=["nfe", "schedules", "cfg"], default=["nfe", "schedules", "cfg"])
    p.add_argument("--replot", action="store_true", help="only redraw the plot and tables from results_<tag>.json")
    p.add_argument("--train", default=SIMPLE, help="src/train.py overrides of the unconditional model")
    p.add_argument("--run-dir", default=str(ROOT / "logs" / "iddpm_nll" / "cpu" / "simple"))
    p.add_argument("--cfg-train", default=CFG, help="src/train.py overrides of the class-conditional model")
    p.add_argument("--cfg-run-dir", default=str(ROOT / "logs" / "sampler_nfe" / "cfg"))
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=SAMPLERS)
    p.add_argument("--nfe", type=int, nargs="+", default=NFE)
    p.add_argument("--schedule-samplers", nargs="+", choices=SAMPLERS, default=SCHEDULE_SAMPLERS)
    p.add_argument("--schedule-nfe", type=int, nargs="+", default=[10, 20])
    p.add_argument("--guidance", type=float, default=3.0, help="w of the cfg part")
    p.add_argument("--cfg-samplers", nargs="+", default=None, help="only the cfg rows of these samplers")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--num-real", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="batch b starts from the generator seeded seed + b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default="cpu", help="results_<tag>.json and fid_vs_nfe_<tag>.png")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    out = OUT / f"results_{args.tag}.json"
    result: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}  # parts run separately add up
    if args.replot:
        plot(result["nfe"], OUT / f"fid_vs_nfe_{args.tag}.png")
        tables(result)
        return
    result.update(hardware=hardware(), **{f"args_{part}": vars(args) for part in args.part})
    if {"nfe", "schedules"} & set(args.part):
        ckpt = ensure_checkpoint(Path(args.run_dir), args.train.split())
        module, record, test = load(ckpt, device)
        data_key = {"data": record["config"]["data"]}
        gm = real_metrics(test, args.num_real, ("fid", "is"), "fmnist_cls", device, data_key)
        result.update(ckpt=str(ckpt), global_step=record["global_step"])
        if "nfe" in args.part:
            new = part_nfe(module, gm, args, device)
            key = lambda r: (r["sampler"], r["target_nfe"])  # noqa: E731
            done = {key(r) for r in new}  # a rerun of some samplers replaces their cells only
            order = {name: k for k, name in enumerate(SAMPLERS)}
            rows = [r for r in result.get("nfe", []) if key(r) not in done] + new
            result["nfe"] = sorted(rows, key=lambda r: (order[r["sampler"]], r["target_nfe"]))
            plot(result["nfe"], OUT / f"fid_vs_nfe_{args.tag}.png")
            write_json(out, result)
        if "schedules" in args.part:
            new = part_schedules(module, gm, args, device)
            key = lambda r: (r["sampler"], r["schedule"], r["target_nfe"])  # noqa: E731
            done = {key(r) for r in new}  # a rerun of some samplers replaces their rows only
            result["schedules"] = [r for r in result.get("schedules", []) if key(r) not in done] + new
            write_json(out, result)
    if "cfg" in args.part:
        new = part_cfg(args, device)
        key = lambda r: (r["row"], r["target_nfe"])  # noqa: E731
        done = {key(r) for r in new}
        result["cfg"] = [r for r in result.get("cfg", []) if key(r) not in done] + new
        write_json(out, result)
    tables(result)


if __name__ == "__main__":
    main()

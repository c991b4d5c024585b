"""Rectified flow vs DDPM+DDIM at 1–50 steps, and what reflow buys (Liu et al. 2022, Table 1's shape).

    python experiments/rectified_flow/run.py                 # the CPU-scale run recorded in RESULTS.md
    python experiments/rectified_flow/run.py --device cuda --tag gpu --num-samples 10000 --num-real 10000 \\
        --train "data=fashion_mnist trainer=gpu" --reflow "trainer=gpu data.image_size=32" --batch-size 1000 \\
        --steps-ddpm 100000 --steps-1rf 100000 --steps-2rf 50000 --warmup-2rf 1000 --num-pairs 50000 \\
        --teacher-steps 100 --run-dir logs/rectified_flow/gpu

Three models of one net and training set, trained with src/train.py unless their last.ckpt exists:
  ddpm  model=ddpm schedule=cosine, sampled with DDIM (η = 0, trailing steps)
  1rf   model=rectified_flow (uniform τ, v-prediction), sampled with flow_euler
  2rf   experiment=reflow from 1rf: K (noise, sample) pairs of 1rf's Euler ODE (``--teacher-steps``), the 1rf weights
        as the start (Liu et al.), ``--steps-2rf`` more steps on the fixed couplings; sampled with flow_euler
FID (difflab's Fashion-MNIST classifier features: fid_fmnist_cls, an offline proxy, NOT an Inception FID) at each
step count, the same initial noise for every cell (batch b from the generator seeded ``seed + b``); straightness
(Liu et al.'s S, 100 Euler steps) of both flows; sample grids at 1 and 10 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.metrics import straightness  # noqa: E402
from difflab.utils.images import save_grid  # noqa: E402
from experiments.common import (  # noqa: E402
    ROOT,
    ensure_checkpoint,
    hardware,
    load,
    markdown_table,
    real_metrics,
    write_json,
)
from experiments.sampler_nfe.run import generate, sampler_factory  # noqa: E402

OUT = Path(__file__).parent
TRAIN = "experiment=quickstart task_name=rectified_flow"  # ddpm and 1rf
# experiment=quickstart's settings spelled out for the reflow run (one experiment= only: it is experiment=reflow)
REFLOW = (
    "data.image_size=16 net=unet_s net.attention_resolutions=[4] trainer=cpu logger=csv data.batch_size=64 "
    "model.optimizer.lr=2e-3 callbacks.ema.decay=0.995 callbacks.ema.warmup=false callbacks.sample_grid=null "
    "trainer.val_check_interval=100 trainer.check_val_every_n_epoch=null trainer.limit_val_batches=2 "
    "trainer.log_every_n_steps=20 samples.num_samples=64 task_name=rectified_flow"
)
SAMPLER = {
    "ddpm": ("ddim", {"eta": 0.0, "spacing": "trailing"}),  # DDIM clips x̂_0 to [-1, 1] by default
    "1rf": ("flow_euler", {}),  # the ODE's own endpoint, no clipping (Liu et al.)
    "2rf": ("flow_euler", {}),
    "1rf_clip": ("flow_euler", {"clip_denoised": True}),  # as DDIM: x̂_0 = x − τ v̂ clamped, v̂ recomputed
    "2rf_clip": ("flow_euler", {"clip_denoised": True}),
}
LABELS = {
    "ddpm": "DDPM + DDIM (η = 0, clipped x̂_0)",
    "1rf": "1-rectified flow (Euler)",
    "2rf": "2-rectified flow (Euler)",
    "1rf_clip": "1-rectified flow, clipped x̂_0",
    "2rf_clip": "2-rectified flow, clipped x̂_0",
}


def train_all(args) -> dict[str, Path]:
    """The checkpoints of ``args.models`` (and 1rf, the teacher of 2rf), trained where missing."""
    run, ckpts = Path(args.run_dir), {}
    models = {m.removesuffix("_clip") for m in args.models}
    if "ddpm" in models:
        ddpm = [*args.train.split(), "model=ddpm", "schedule=cosine", f"trainer.max_steps={args.steps_ddpm}"]
        ckpts["ddpm"] = ensure_checkpoint(run / "ddpm", ddpm)
    if {"1rf", "2rf"} & models:
        rf1 = [*args.train.split(), "model=rectified_flow", f"trainer.max_steps={args.steps_1rf}"]
        ckpts["1rf"] = ensure_checkpoint(run / "rf1", rf1)
    if "2rf" in models:
        reflow = [
            *args.reflow.split(),
            "experiment=reflow",
            f"model.teacher_ckpt={ckpts['1rf']}",
            f"data.num_pairs={args.num_pairs}",
            f"data.teacher_steps={args.teacher_steps}",
            f"data.cache_path={run / 'reflow_pairs.pt'}",
            f"trainer.max_steps={args.steps_2rf}",
            f"model.lr_scheduler.warmup_steps={args.warmup_2rf}",
        ]
        ckpts["2rf"] = ensure_checkpoint(run / "rf2", reflow)
    return ckpts


def evaluate(name: str, ckpt: Path, args, device, gm_cache: dict) -> list[dict[str, Any]]:
    module, record, test = load(ckpt, device)
    module.sample_batch_size = args.batch_size
    if "gm" not in gm_cache:  # real statistics of the teacher's / data's test set, once
        key = {"data": record["config"]["data"]}
        gm_cache["gm"] = real_metrics(test, args.num_real, ("fid",), "fmnist_cls", device, key)
    gm = gm_cache["gm"]
    sampler_name, overrides = SAMPLER[name]
    rows = []
    for steps in args.steps:
        sampler = module.build_sampler(sampler_factory(sampler_name, **overrides, steps=steps))
        images, seconds = generate(module, sampler, steps, args.num_samples, args.batch_size, device, seed=args.seed)
        gm.update_fake(images)
        row = {"model": name, "steps": steps, "nfe": sampler.nfe, "seconds": round(seconds, 1)}
        row.update({k: float(v) for k, v in gm.compute().items()}, global_step=record["global_step"])
        print(row, flush=True)
        rows.append(row)
        if steps in (1, 10):
            save_grid(images[:64], OUT / f"samples_{name}_{steps}step_{args.tag}.png", nrow=8)
    if name in ("1rf", "2rf"):
        g = torch.Generator(device).manual_seed(args.seed)
        s = straightness(module, args.straightness_samples, 100, g)
        rows.append({"model": name, **s})
        print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path, steps: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, (name, label) in enumerate(LABELS.items()):
        cells = [r for r in rows if r["model"] == name and "steps" in r]
        style = {"linestyle": "--", "color": f"C{k - 2}"} if name.endswith("_clip") else {"color": f"C{k}"}
        if cells:
            xs, ys = [r["steps"] for r in cells], [r["fid_fmnist_cls"] for r in cells]
            ax.plot(xs, ys, marker="o", label=label, **style)
    ax.set(xscale="log", yscale="log", xlabel="sampling steps (= NFE)", ylabel="FID (fmnist_cls features)")
    ax.set_xticks(steps, labels=[str(s) for s in steps])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict], steps: list[int]) -> str:
    by = {(r["model"], r["steps"]): r["fid_fmnist_cls"] for r in rows if "steps" in r}
    s = {r["model"]: r["straightness"] for r in rows if "straightness" in r}
    models = [m for m in SAMPLER if any(r["model"] == m for r in rows)]
    body = [[LABELS[m], *(by.get((m, k), "—") for k in steps), s.get(m, "—")] for m in models]
    return markdown_table(["FID_fmnist_cls \\ steps", *map(str, steps), "straightness S"], body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=TRAIN, help="src/train.py overrides of ddpm and 1rf")
    p.add_argument("--reflow", default=REFLOW, help="src/train.py overrides of 2rf (with experiment=reflow)")
    p.add_argument("--run-dir", default=str(ROOT / "logs" / "rectified_flow" / "cpu"))
    p.add_argument("--steps-ddpm", type=int, default=500)
    p.add_argument("--steps-1rf", type=int, default=500)
    p.add_argument("--steps-2rf", type=int, default=200, help="reflow steps after the warm start from 1rf")
    p.add_argument("--warmup-2rf", type=int, default=20)
    p.add_argument("--num-pairs", type=int, default=2048)
    p.add_argument("--teacher-steps", type=int, default=20, help="Euler steps of 1rf's ODE for the pairs")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 50])
    p.add_argument("--models", nargs="+", default=["ddpm", "1rf", "2rf"], choices=list(SAMPLER))
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--num-real", type=int, default=1000)
    p.add_argument("--straightness-samples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default="cpu", help="results_<tag>.json, fid_vs_steps_<tag>.png, samples_*_<tag>.png")
    p.add_argument("--replot", action="store_true", help="only redraw the plot and table from results_<tag>.json")
    args = p.parse_args(argv)
    out = OUT / f"results_{args.tag}.json"
    if args.replot:
        result = json.loads(out.read_text())
    else:
        device = torch.device(args.device)
        ckpts = train_all(args)
        cache: dict = {}
        for name in args.models:
            rows = evaluate(name, ckpts[name.removesuffix("_clip")], args, device, cache)
            result = json.loads(out.read_text()) if out.is_file() else {"rows": [], "ckpts": {}}  # runs add up
            result["rows"] = [r for r in result["rows"] if r["model"] != name] + rows
            result["ckpts"][name] = str(ckpts[name.removesuffix("_clip")])
            result.update(hardware=hardware(), args=vars(args))
            write_json(out, result)
    steps = sorted({r["steps"] for r in result["rows"] if "steps" in r})  # over every run that added rows
    plot(result["rows"], OUT / f"fid_vs_steps_{args.tag}.png", steps)
    print(table(result["rows"], steps))


if __name__ == "__main__":
    main()

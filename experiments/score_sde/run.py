"""Score-based models and EDM at CPU scale (issue 29): three tables on 16x16 Fashion-MNIST, FID on our feature nets.

    python experiments/score_sde/run.py                        # every part, the CPU scale (≈ 1 h on 2 cores)
    python experiments/score_sde/run.py --parts nfe --num-samples 1000

Models, trained once into ``logs/score_sde/<tag>/<name>`` with the quickstart recipe (``experiment=quickstart``: 900
steps of batch 64, Adam 2e-3, EMA 0.995, unet_s, the same seed), so training compute is equal:
  ddpm_eps  DDPM, ε-prediction (the quickstart itself)     ddpm_v  the same with v-prediction
  edm       model=edm (EDM preconditioning, ln σ ~ N(−1.2, 1.2²))
  ve        model=ncsn (VE SDE: σ ∈ [0.01, 25.1], λ(σ) = σ²)   vp_sde  model=edm schedule.preconditioning=vp
  iddpm_hybrid  model=iddpm schedule=cosine (learned Σ, L_hybrid; experiments/iddpm_nll's model at this budget)
Parts: ``nfe`` (table 1: FID against NFE, Heun and DPM-Solver++(2M), for ddpm_eps, ddpm_v, edm), ``pc`` (table 2:
predictor-only, corrector-only, PC and annealed Langevin at equal NFE on ve and vp_sde), ``nll`` (table 3: the
PF-ODE bits/dim against the VLB of the discrete models, with their standard errors; the others' ODE bits/dim).
Rows go to ``experiments/score_sde/results_<tag>.json`` (a cell already there is skipped); ``plot.py`` draws them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.utils.paths import write_text_atomic  # noqa: E402
from experiments.bench.quality import our_factory  # noqa: E402
from experiments.common import ROOT, ensure_checkpoint, hardware, real_metrics  # noqa: E402

OUT = ROOT / "experiments" / "score_sde"  # the tables
LOGS = ROOT / "logs" / "score_sde"  # the models
MODELS: dict[str, list[str]] = {
    "ddpm_eps": [],
    "ddpm_v": ["model.parameterization=v"],
    "edm": ["model=edm"],
    "ve": ["model=ncsn"],
    "vp_sde": ["model=edm", "schedule.preconditioning=vp"],
    "iddpm_hybrid": ["model=iddpm", "schedule=cosine"],  # learned Σ, L_hybrid: table 3 only (experiments/iddpm_nll)
}
VLB_MODELS = ("ddpm_eps", "ddpm_v", "iddpm_hybrid")  # the discrete diffusions, whose VLB table 3 sets beside the ODE
# table 1: (sampler conf, overrides, steps) per cell; NFE = 2 steps − 1 for Heun
NFE_CELLS: dict[str, tuple[str, dict[str, Any], int]] = {
    "heun 5 (NFE 9)": ("heun", {"clip_denoised": False, "sigma_max": None}, 5),
    "heun 10 (NFE 19)": ("heun", {"clip_denoised": False, "sigma_max": None}, 10),
    "heun 18 (NFE 35)": ("heun", {"clip_denoised": False, "sigma_max": None}, 18),
    "dpmpp_2m 10": ("dpmpp_2m", {"clip_denoised": False, "sigma_max": None}, 10),
    "dpmpp_2m 20": ("dpmpp_2m", {"clip_denoised": False, "sigma_max": None}, 20),
}
# table 2: equal NFE (≈ 2 · levels), Song et al.'s settings (snr 0.16, one corrector step), levels from the process
PC_CELLS: dict[str, tuple[str, dict[str, Any], int]] = {
    "predictor only (P)": ("pc", {"corrector_steps": 0}, 100),
    "predictor only, PC's 50 levels (half the NFE)": ("pc", {"corrector_steps": 0}, 50),
    "corrector only (C)": ("pc", {"predictor": "none", "corrector_steps": 2}, 50),
    "predictor-corrector (PC)": ("pc", {"corrector_steps": 1}, 50),
    "annealed Langevin": ("langevin", {"n_steps_each": 2, "step_size": 2e-5}, 50),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["nfe", "pc", "nll"], choices=["nfe", "pc", "nll"])
    p.add_argument("--seed", type=int, default=0, help="training seed (use another --tag per seed)")
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS), help="only these (default: all)")
    p.add_argument("--steps", type=int, default=900, help="training steps of every model")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per FID cell (table 1)")
    p.add_argument("--pc-samples", type=int, default=500, help="samples per FID cell (table 2)")
    p.add_argument("--num-real", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--nll-images", type=int, default=64)
    p.add_argument("--nll-rtol", type=float, default=1e-5)
    p.add_argument("--feature-nets", nargs="+", default=["fmnist_cls_v2"])
    p.add_argument("--tag", default="cpu")
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every training run (GPU scale)")
    p.add_argument("--device", default="cpu", help="where the models sample and are evaluated (cuda on a GPU)")
    return p.parse_args(argv)


def checkpoint(name: str, args) -> Path:
    """The model's last.ckpt, trained with the quickstart recipe when missing (resumed when stopped half-way)."""
    run = LOGS / args.tag / f"{name}_s{args.seed}"
    overrides = ["experiment=quickstart", f"seed={args.seed}", f"trainer.max_steps={args.steps}"]
    return ensure_checkpoint(run, [*overrides, "samples.num_samples=0", *MODELS[name], *args.extra], True)


@torch.no_grad()
def draw(module: Any, conf: str, overrides: dict[str, Any], steps: int, num: int, batch: int) -> tuple[Any, int]:
    """(num images, NFE per chain) from batches seeded 0, 1, …"""
    sampler = module.build_sampler(our_factory(conf, overrides))
    chunks = []
    for b, first in enumerate(range(0, num, batch)):
        generator = torch.Generator(device=module.device).manual_seed(b)
        chunks.append(module.sample(min(batch, num - first), generator, sampler, steps))
    return torch.cat(chunks), sampler.nfe


def fid_rows(part: str, models: list[str], cells: dict, num: int, args, judges, done, emit) -> None:
    from difflab.modules import load_module

    for name in [m for m in models if args.models is None or m in args.models]:
        module = load_module(checkpoint(name, args))[0].to(args.device).eval()
        for cell, (conf, overrides, steps) in cells.items():
            if (part, name, cell) in done:
                continue
            start = time.perf_counter()
            images, nfe = draw(module, conf, overrides, steps, num, args.batch_size)
            row = {"part": part, "model": name, "sampler": cell, "nfe": nfe, "num_samples": num}
            row["sample_seconds"] = round(time.perf_counter() - start, 1)
            for gm in judges.values():
                gm.update_fake(images)
                row.update(gm.compute())
            emit(row)


def nll_rows(args, test_set, done, emit) -> None:
    """PF-ODE bits/dim of every model; the VLB of ddpm_eps on the same images (mean ± standard error)."""
    from difflab.modules import load_module

    x = torch.stack([test_set[i][0] for i in range(args.nll_images)]).to(args.device)
    for name in [m for m in MODELS if args.models is None or m in args.models]:
        module = load_module(checkpoint(name, args))[0].to(args.device).eval()
        for kind in ("ode", "vlb") if name in VLB_MODELS else ("ode",):
            if ("nll", name, kind) in done:
                continue
            start, generator = time.perf_counter(), torch.Generator(device=args.device).manual_seed(0)
            if kind == "vlb":
                bpd, nfe = module.nll(x, None, generator)["total_bpd"], module.diffusion.num_timesteps
            else:
                bpd, nfe = module.ode_nll(x, None, generator, rtol=args.nll_rtol, atol=args.nll_rtol)
            bpd = bpd.double()
            row = {"part": "nll", "model": name, "sampler": kind, "nfe": nfe, "images": bpd.numel()}
            row |= {"bpd": float(bpd.mean()), "bpd_se": float(bpd.std() / math.sqrt(bpd.numel()))}
            row["bpd_images"] = [round(float(v), 4) for v in bpd]  # the same images for every model: paired differences
            row |= {"rtol": args.nll_rtol if kind == "ode" else None, "seconds": round(time.perf_counter() - start)}
            emit(row)


def main(argv: list[str] | None = None) -> None:
    from difflab.data import FashionMNISTDataModule
    from difflab.utils.config import register_resolvers

    register_resolvers()
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    test = FashionMNISTDataModule(str(ROOT / "data"), image_size=16, batch_size=500)
    test.setup("test")
    out = OUT / f"results_{args.tag}.json"
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["part"], r["model"], r["sampler"]) for r in rows}

    def emit(row: dict[str, Any]) -> None:
        print(json.dumps(row), flush=True)
        rows.append(row)
        table = {"args": vars(args), "hardware": hardware(), "rows": rows}
        write_text_atomic(out, json.dumps(table, indent=2, default=str))

    judges = {}
    if {"nfe", "pc"} & set(args.parts):
        key = {"data": "fashion_mnist test 16x16"}
        device = torch.device(args.device)
        judges = {n: real_metrics(test.test, args.num_real, ("fid", "is"), n, device, key) for n in args.feature_nets}
    if "nfe" in args.parts:
        fid_rows("nfe", ["ddpm_eps", "ddpm_v", "edm"], NFE_CELLS, args.num_samples, args, judges, done, emit)
    if "pc" in args.parts:
        fid_rows("pc", ["ve", "vp_sde"], PC_CELLS, args.pc_samples, args, judges, done, emit)
    if "nll" in args.parts:
        nll_rows(args, test.test, done, emit)


if __name__ == "__main__":
    main()

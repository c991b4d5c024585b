"""Few-step generation: FID against NFE (1, 2, 4, 8) for the teacher's solvers and for the models made from it.

    python experiments/few_step/run.py                         # the CPU run recorded in RESULTS.md (every part)
    python experiments/few_step/run.py --part solvers          # one part; results_<tag>.json collects the parts

One teacher: the cosine L_simple Fashion-MNIST model of experiments/sampler_nfe (``TEACHER``: ε-prediction, fixed
variance, cosine schedule, T = 1000, 16x16, unet_s, 1,500 steps). Parts:

- ``solvers``: the teacher with DDIM (η = 0), DPM-Solver++(2M), PLMS and Analytic-DPM (DDPM and DDIM with the optimal
  variance, Γ estimated by ``src/analytic.py``) at each NFE;
- ``progressive``: progressive distillation (Salimans & Ho 2022) from ``--pd-start`` steps down to 1, each round's
  checkpoint sampled at its own step count;
- ``cd``: consistency distillation (Song et al. 2023) from the teacher, sampled with 1, 2, 4 and 8 steps;
- ``ct``: improved consistency training (Song & Dhariwal 2023), no teacher, same sampling;
- ``rf``: the 2-rectified flow of the teacher's probability-flow ODE (reflow, Liu et al. 2022; from a diffusion model
  as InstaFlow, Liu et al. 2023): ``experiment=reflow`` on ``--rf-pairs`` couplings (ε, x̂_0 = DPM-Solver++(2M) at 20
  steps from x_T = ε), the flow student starting from the teacher's network, sampled with Euler at each NFE; and its
  one-step distillation (reflow with the k = 1 regression on the 2-RF's own 20-step Euler pairs), sampled at 1 NFE.

Every cell: ``--num-samples`` samples per noise seed (``--seeds``: batch b starts from the generator seeded
seed·1000 + b, the same initial noise for every method at a seed), FID on ``fmnist_cls_v2`` and ``fmnist_cls`` (v1)
against ``--num-real`` Fashion-MNIST test images (offline proxies, NOT Inception numbers). Training cost: the images
each method's training saw (its own run plus, for distillation, the teacher's), the network evaluations that made
reflow's pairs (part of its run's wall time) and its wall time on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.utils.checkpoint_io import load_checkpoint  # noqa: E402
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
from experiments.sampler_nfe.run import sampler_factory  # noqa: E402

OUT = Path(__file__).parent
LOGS = ROOT / "logs" / "few_step"
NFE = [1, 2, 4, 8]
FEATURE_NETS = ("fmnist_cls_v2", "fmnist_cls")
# the sampler_nfe study's model (experiments/iddpm_nll's CPU L_simple run), EMA as recorded there
TEACHER = "experiment=quickstart trainer.max_steps=1500 callbacks.ema.warmup=false model=ddpm schedule=cosine"
SOLVERS = {  # row name → (conf/sampler file, overrides)
    "DDIM (η = 0)": ("ddim", {}),
    "DPM-Solver++(2M)": ("dpmpp_2m", {}),
    "PLMS": ("plms", {}),
    "Analytic-DPM (DDPM)": ("ddpm", {"variance_type": "analytic", "spacing": "trailing"}),
    "Analytic-DDIM (η = 0)": ("ddim", {"variance_type": "analytic"}),
}


def steps_for(sampler, nfe: int) -> int | None:
    """The most steps whose network evaluations fit in ``nfe`` (None when none does: PNDM's warm-up, a multistep
    solver's minimum number of steps)."""
    for steps in range(nfe, 0, -1):
        try:
            if sampler.num_evaluations(steps) <= nfe:
                sampler.set_timesteps(steps)
                return steps
        except ValueError:
            continue
    return None


def generate(module, sampler, steps: int | None, num: int, batch: int, device, seed: int) -> tuple[torch.Tensor, float]:
    """``num`` samples; batch b starts from the generator seeded seed·1000 + b. Returns (images, seconds)."""
    start, chunks = time.time(), []
    for b, first in enumerate(range(0, num, batch)):
        g = torch.Generator(device).manual_seed(seed * 1000 + b)
        with sampling_precision(device):
            chunks.append(module.sample(min(batch, num - first), g, sampler, steps))
    return torch.cat(chunks), time.time() - start


class Scorer:
    """FID of generated images on each feature net, against the real statistics of the teacher's test set."""

    def __init__(self, test, record, args, device) -> None:
        key = {"data": record["config"]["data"]}
        self.metrics = {net: real_metrics(test, args.num_real, ("fid",), net, device, key) for net in FEATURE_NETS}

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        scores = {}
        for net, gm in self.metrics.items():
            gm.update_fake(images)
            scores[f"fid_{net}"] = float(gm.compute()[f"fid_{net}"])
        return scores


def cell(method: str, module, sampler, steps: int | None, nfe: int, score: Scorer, args, device) -> list[dict]:
    """One (method, NFE) cell at every seed (each row also saved as it is made: ``args.save``)."""
    rows = []
    for seed in args.seeds:
        images, seconds = generate(module, sampler, steps, args.num_samples, args.batch_size, device, seed)
        row = {"method": method, "nfe": nfe, "steps": steps, "seed": seed, "seconds": round(seconds, 1)}
        row.update(score(images))
        print(row, flush=True)
        rows.append(row)
        args.save([row])
    return rows


def part_solvers(teacher, score, args, device) -> list[dict]:
    rows = []
    for method, (name, overrides) in SOLVERS.items():
        if args.solvers and name not in args.solvers and method not in args.solvers:
            continue
        if overrides.get("variance_type") == "analytic":  # Γ beside the teacher (python src/analytic.py ckpt=...)
            overrides = {**overrides, "gamma": str(Path(args.teacher_ckpt).with_suffix(".analytic.safetensors"))}
        try:  # steps=None (T) at construction: the cells set their own
            sampler = teacher.build_sampler(sampler_factory(name, **{"steps": None, **overrides}))
        except (ValueError, FileNotFoundError) as error:  # e.g. no Γ file yet: src/analytic.py writes it
            print(f"skip {method}: {error}", flush=True)
            continue
        for nfe in args.nfe:
            steps = steps_for(sampler, nfe)
            if steps is None:
                print(f"skip {method} at {nfe} NFE: its first step needs more evaluations", flush=True)
                continue
            rows += cell(method, teacher, sampler, steps, sampler.num_evaluations(steps), score, args, device)
    return rows


# the students' runs: the teacher's data, batch and EMA; a validation pass every 500 steps on 2 batches
STUDENT = [
    "trainer=cpu",
    "data.batch_size=64",
    "data.val_size=512",
    "trainer.val_check_interval=500",
    "trainer.check_val_every_n_epoch=null",
    "trainer.limit_val_batches=2",
    "callbacks.ema.decay=0.995",
]
REFLOW = [
    "experiment=reflow",
    "trainer.max_steps=1500",
    "model.optimizer.lr=2e-4",
    "model.lr_scheduler.warmup_steps=100",
]
TRAIN = {  # part → src/train.py overrides (the teacher checkpoint appended where needed)
    # 16 → 8 → 4 → 2 → 1 DDIM steps, 400 optimizer steps per round
    "progressive": ["experiment=progressive_distill", "model.start_steps=16", "model.rounds=4"],
    "cd": ["experiment=consistency_distill", "trainer.max_steps=1500"],
    # no teacher: the teacher's network (unet_s, attention at 4x4) and image size, trained from scratch
    "ct": ["experiment=consistency_training", "trainer.max_steps=3000", "net=unet_s", "net.attention_resolutions=[4]"],
    # 2-rectified flow: a flow student from the teacher's net on its DPM-Solver++(2M) ODE solutions (20 steps: the
    # teacher's best solver in part solvers); then its one-step distillation on its own 20-step Euler solutions.
    # lr 2e-4 (Liu et al.'s) after the teacher's 100 warm-up steps (the DDPM default's 5,000 would cap it at 6e-5)
    "rf": [*REFLOW, "data.teacher_sampler=dpmpp_2m", "data.teacher_steps=20"],
    "rf_distill": [*REFLOW, "model.timestep_sampler.distribution=one_step", "data.teacher_steps=20"],
}
PD_STEPS_PER_ROUND = 400
RF_PAIRS = 8192
PAIRS_FILE = "reflow_pairs.pt"  # reflow's couplings, in the run's folder (their generation cost is read back)
RF, RF_DISTILL = "2-rectified flow (reflow of the ODE)", "2-RF + one-step distillation"


def student_checkpoint(part: str, teacher_ckpt: Path, args) -> Path:
    """Train (once) the student of ``part`` into logs/few_step/<part> (resuming a run stopped half-way); its last
    checkpoint."""
    overrides = [*TRAIN[part], *STUDENT, "task_name=few_step", *args.student_extra]
    if part == "progressive":
        overrides.append(f"model.steps_per_round={args.pd_steps_per_round}")
    if part.startswith("rf"):
        overrides += [f"data.num_pairs={args.rf_pairs}", f"data.cache_path={args.logs / part / PAIRS_FILE}"]
    if part == "ct":
        overrides += ["data.image_size=16"]
    else:
        overrides.append(f"model.teacher_ckpt={teacher_ckpt}")
    return ensure_checkpoint(args.logs / part, overrides, resume_unfinished=True)  # a killed run goes on, bit-exact


def part_progressive(teacher, score, args, device) -> list[dict]:
    """Each round's checkpoint at its own step count (DDIM η = 0, trailing)."""
    student_checkpoint("progressive", Path(args.teacher_ckpt), args)
    rows = []
    for ckpt in sorted((args.logs / "progressive" / "checkpoints").glob("round_*steps.ckpt")):
        module, _, _ = load(ckpt, device)
        steps = module.sampler.num_steps
        if steps in args.nfe:
            rows += cell("progressive distillation", module, None, steps, steps, score, args, device)
    return rows


def consistency_part(part: str, method: str):
    def run(teacher, score, args, device) -> list[dict]:
        module, _, _ = load(student_checkpoint(part, Path(args.teacher_ckpt), args), device)
        return [r for nfe in args.nfe for r in cell(method, module, None, nfe, nfe, score, args, device)]

    return run


def part_rf(teacher, score, args, device) -> list[dict]:
    """The 2-RF at each NFE (Euler steps = NFE) and its one-step distillation at 1 NFE (a one-step map: no other)."""
    rf_ckpt = student_checkpoint("rf", Path(args.teacher_ckpt), args)
    distilled_ckpt = student_checkpoint("rf_distill", rf_ckpt, args)
    rows = []
    for method, ckpt, nfes in ((RF, rf_ckpt, args.nfe), (RF_DISTILL, distilled_ckpt, [n for n in args.nfe if n == 1])):
        module, _, _ = load(ckpt, device)
        euler = module.build_sampler(sampler_factory("flow_euler"))
        rows += [r for nfe in nfes for r in cell(method, module, euler, nfe, nfe, score, args, device)]
    return rows


def training_cost(run_dir: Path) -> dict[str, Any]:
    """Images seen and wall time of a training run (its run_summary.json); for reflow also the network evaluations
    and seconds that made its pairs (recorded in its pairs file; the wall time includes them)."""
    summary_file = run_dir / "run_summary.json"
    if not summary_file.is_file():
        return {}
    summary = json.loads(summary_file.read_text())
    cost = {"train_images": summary.get("train_images"), "train_seconds": round(summary.get("wall_time_s", 0.0))}
    cost["threads"] = int(os.environ.get("OMP_NUM_THREADS", 2))  # this process's; src/train.py inherits it
    if (run_dir / PAIRS_FILE).is_file():
        generation = load_checkpoint(run_dir / PAIRS_FILE, "pairs").get("generation") or {}
        cost["pair_evaluations"] = generation.get("network_evaluations")
        cost["pair_seconds"] = round(generation.get("seconds", 0.0))
    return cost


# costs key → (row of the cost table, the runs its model is made from)
COST_ROWS = {
    "teacher": ("teacher", []),
    "progressive": ("progressive distillation", ["teacher"]),
    "cd": ("consistency distillation", ["teacher"]),
    "ct": ("consistency training (no teacher)", []),
    "rf": (RF, ["teacher"]),
    "rf_distill": (RF_DISTILL, ["teacher", "rf"]),
}


def cost_table(costs: dict[str, dict]) -> str:
    """The training costs as a markdown table: images seen, network evaluations of reflow's pairs, the same summed
    over the runs it is made from, wall time (pairs included) and CPU-hours (wall × the run's threads: OMP_NUM_THREADS,
    recorded with the cost; 2 when not recorded)."""
    count = lambda n: f"{n:,}" if n else "—"  # noqa: E731
    body = []
    for key, (name, upstream) in COST_ROWS.items():
        cost = costs.get(key)
        if not cost:
            continue
        before = [costs.get(u) or {} for u in upstream]
        images = sum(c.get("train_images") or 0 for c in before)
        pairs = sum(c.get("pair_evaluations") or 0 for c in before)
        pair_cell = (
            f"{count(cost.get('pair_evaluations'))} ({cost['pair_seconds']:,} s)" if "pair_seconds" in cost else "—"
        )
        body.append(
            [
                name,
                count(cost.get("train_images")),
                pair_cell,
                f"{count(images)} / {count(pairs)}" if upstream else "—",
                f"{cost.get('train_seconds', 0):,}",
                f"{cost.get('train_seconds', 0) * cost.get('threads', 2) / 3600:.2f}",
            ]
        )
    header = ["method", "images seen", "pair generation: NFE (s)", "+ upstream: images / pair NFE", "wall (s)", "CPU-h"]
    return markdown_table(header, body)


def merge(result: dict, part: str, new: list[dict]) -> None:
    """Add ``new`` rows to ``result[part]``, replacing rows of the same (method, nfe, seed)."""
    key = lambda r: (r["method"], r["nfe"], r["seed"])  # noqa: E731
    done = {key(r) for r in new}
    result[part] = [r for r in result.get(part, []) if key(r) not in done] + new


def tables(result: dict) -> None:
    rows = [r for part in PARTS for r in result.get(part, [])]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for net in FEATURE_NETS:
        by = {}
        for r in rows:
            by.setdefault((r["method"], r["nfe"]), []).append(r[f"fid_{net}"])
        body = [
            [m, *(" / ".join(f"{v:.2f}" for v in by[(m, n)]) if (m, n) in by else "—" for n in NFE)] for m in methods
        ]
        print(markdown_table([f"FID {net} (seeds) \\ NFE", *map(str, NFE)], body))
    print(cost_table(result.get("costs", {})))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = [r for part in PARTS for r in result.get(part, [])]
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        cells = {}
        for r in rows:
            if r["method"] == method:
                cells.setdefault(r["nfe"], []).append(r["fid_fmnist_cls_v2"])
        nfe = sorted(cells)
        style = {"linestyle": "--"} if any(method.startswith(s.split()[0]) for s in SOLVERS) else {"linewidth": 2.2}
        if len(nfe) == 1:  # a single cell (a one-step model): a marker, no line
            style = {"linestyle": "none", "markersize": 9}
        ax.plot(nfe, [sum(cells[n]) / len(cells[n]) for n in nfe], marker="os^vDP*Xph"[k % 10], label=method, **style)
    ax.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)", ylabel="FID (fmnist_cls_v2), mean of seeds")
    ax.set_xticks(NFE, labels=[str(n) for n in NFE])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside: every cell visible
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="+", choices=list(PARTS), default=["solvers"])
    p.add_argument("--replot", action="store_true", help="only redraw the plot and tables from results_<tag>.json")
    p.add_argument("--teacher", default=TEACHER, help="src/train.py overrides of the teacher")
    p.add_argument("--teacher-dir", default=None, help="the teacher's run dir (default: <logs>/teacher)")
    p.add_argument("--logs", type=Path, default=None, help="where the runs go (default: logs/few_step)")
    p.add_argument("--student-extra", nargs="*", default=[], help="src/train.py overrides added to every student")
    p.add_argument("--nfe", type=int, nargs="+", default=NFE)
    p.add_argument("--solvers", nargs="+", default=None, help="part solvers: only these rows (or sampler files)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--pd-steps-per-round", type=int, default=PD_STEPS_PER_ROUND)
    p.add_argument("--rf-pairs", type=int, default=RF_PAIRS, help="part rf: the couplings of each reflow")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--num-real", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default="cpu", help="results_<tag>.json and fid_vs_nfe_<tag>.png")
    args = p.parse_args(argv)
    args.logs = args.logs or LOGS
    args.teacher_dir = args.teacher_dir or str(args.logs / "teacher")
    device = torch.device(args.device)
    out = OUT / f"results_{args.tag}.json"
    result: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    if not args.replot:
        ckpt = ensure_checkpoint(Path(args.teacher_dir), [*args.teacher.split(), "task_name=few_step"])
        teacher, record, test = load(ckpt, device)
        score = Scorer(test, record, args, device)
        result.update(hardware=hardware(), teacher=str(ckpt), teacher_step=record["global_step"])
        args.teacher_ckpt = str(ckpt)
        costs = {"teacher": training_cost(Path(args.teacher_dir))}  # this process's runs: the rest is read back
        for part in args.part:

            def save(rows: list[dict] | None = None, part: str = part) -> None:
                on_disk = json.loads(out.read_text()) if out.is_file() else {}  # another part may run beside
                for name in PARTS:
                    merge(result, name, on_disk.get(name, []) if name != part else [])
                merge(result, part, rows or [])
                result["costs"] = {**result.get("costs", {}), **on_disk.get("costs", {}), **costs}
                write_json(out, result)

            args.save = save
            PARTS[part](teacher, score, args, device)
            for run in RUNS.get(part, [part]):
                costs[run] = training_cost(args.logs / run)
            save()
    plot(result, OUT / f"fid_vs_nfe_{args.tag}.png")
    tables(result)


PARTS = {
    "solvers": part_solvers,
    "progressive": part_progressive,
    "cd": consistency_part("cd", "consistency distillation"),
    "ct": consistency_part("ct", "consistency training"),
    "rf": part_rf,
}
RUNS = {"solvers": [], "rf": ["rf", "rf_distill"]}  # the training runs of a part (default: the part's name)

if __name__ == "__main__":
    main()

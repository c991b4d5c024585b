"""Architectures at a fixed training budget: UNets and Diffusion Transformers of several Gflops, on Fashion-MNIST
pixels and on the shipped kl-f4 latents; FID (fmnist_cls) against Gflops per forward and against training compute.

    python experiments/arch_sweep/run.py --scale cpu             # the CPU-scale run recorded in RESULTS.md
    python experiments/arch_sweep/run.py --scale gpu             # the full-size run on one GPU
    python experiments/arch_sweep/run.py --scale cpu --report    # only re-read the sweeps, table and plots

Each space is one Hydra multirun of ``src/train.py`` over ``net=`` (every job the same optimiser, batch, steps and
evaluation); the platform's ``SweepSummary`` callback writes ``sweep_summary.{csv,md}`` into each sweep dir and this
script reads the same per-job ``run_summary.json`` files. Training compute follows DiT: Gflops per forward x 3
(forward + backward) x training images. FID/KID use the shipped Fashion-MNIST classifier's features
(``fid_fmnist_cls``), never Inception: compare rows, not levels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.utils.sweep_summary import collect_jobs  # noqa: E402
from experiments.common import ROOT, hardware, markdown_table, write_json  # noqa: E402

OUT = Path(__file__).resolve().parent
CONF = OUT / "conf"  # the study's own net presets (CPU-scale DiTs and UNets), added to Hydra's search path

# The same for every job of a scale: optimiser, batch, steps, EMA, evaluation (FID at fit end, DDIM 50 steps).
COMMON = {
    "cpu": [
        "data=fashion_mnist",
        "trainer=cpu",
        "data.batch_size=32",
        "data.val_size=512",
        "trainer.max_steps=700",
        "trainer.val_check_interval=350",
        "trainer.check_val_every_n_epoch=null",
        "trainer.limit_val_batches=4",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "model.optimizer.lr=1e-3",
        "model.lr_scheduler.warmup_steps=100",
        "callbacks=[default,generative_metrics]",
        "callbacks.sample_grid=null",
        "callbacks.ema.decay=0.999",
        "callbacks.generative_metrics.metrics=[fid,kid]",
        "callbacks.generative_metrics.num_samples=500",
        "callbacks.generative_metrics.num_real=2000",
        "sampler=ddim",
        "sampler.steps=25",
        "samples.num_samples=64",
        "logger=csv",
    ],
    "gpu": [
        "data=fashion_mnist",
        "trainer=gpu",
        "data.batch_size=256",
        "trainer.max_steps=20000",
        "trainer.val_check_interval=5000",
        "trainer.check_val_every_n_epoch=null",
        "trainer.enable_progress_bar=false",
        "model.optimizer.lr=3e-4",
        "model.lr_scheduler.warmup_steps=1000",
        "model.compile=default",
        "callbacks=[default,generative_metrics]",
        "callbacks.sample_grid=null",
        "callbacks.generative_metrics.metrics=[fid,kid]",
        "callbacks.generative_metrics.every_n_epochs=1000",
        "callbacks.generative_metrics.num_samples=10000",
        "callbacks.generative_metrics.num_real=10000",
        "sampler=ddim",
        "sampler.steps=50",
        "logger=csv",
    ],
}
# Per space: the model and the nets swept (study presets in conf/net/ here, platform presets in conf/net/).
SPACES = {
    "cpu": {
        "pixel": (
            ["model=ddpm", "data.image_size=16"],
            ["unet_s", "dit_xs4", "dit_xs2", "dit_ss4", "dit_ss2"],
        ),
        "latent": (
            # the latents of one epoch's images, encoded once (700 steps x 32 = 22,400; the pixel runs draw as many)
            ["model=ldm", "model.conditioner=null", "model.cache_latents=true", "data.image_size=32"]
            + ["data.limit_train_size=22400"],
            ["unet_latent32", "dit_xs2", "dit_xs1", "dit_ss2", "dit_ss1"],
        ),
    },
    "gpu": {
        "pixel": (
            ["model=ddpm", "data.image_size=32"],
            ["unet_s", "unet_m", "dit_s4", "dit_s2", "dit_b4", "dit_b2"],
        ),
        "latent": (
            ["model=ldm", "model.conditioner=null", "model.cache_latents=true", "data.image_size=32"],
            ["unet_latent", "dit_s2", "dit_b2", "dit_xs1", "dit_ss1", "dit_l2"],
        ),
    },
}


def sweep_command(scale: str, space: str) -> list[str]:
    """The ``src/train.py -m`` command of one space."""
    model, nets = SPACES[scale][space]
    return [
        sys.executable,
        str(ROOT / "src" / "train.py"),
        "-m",
        f"hydra.searchpath=[file://{CONF}]",
        "task_name=arch_sweep",
        f"hydra.sweep.dir={sweep_dir(scale, space)}",
        *COMMON[scale],
        *model,
        "net=" + ",".join(nets),
    ]


def sweep_dir(scale: str, space: str) -> Path:
    return ROOT / "logs" / "arch_sweep" / scale / space


def run_sweep(scale: str, space: str) -> None:
    """Run the multirun unless every job of it finished (its run_summary.json says ok)."""
    nets = SPACES[scale][space][1]
    done = [row for row in collect_jobs(sweep_dir(scale, space)) if row["status"] == "ok"]
    if len(done) == len(nets):
        print(f"{space}: all {len(nets)} jobs done in {sweep_dir(scale, space)}", flush=True)
        return
    cmd = sweep_command(scale, space)
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def results(scale: str) -> list[dict[str, Any]]:
    """One record per job of both spaces, from the sweeps' run summaries."""
    records = []
    for space in SPACES[scale]:
        for row in collect_jobs(sweep_dir(scale, space)):
            net = next(o.split("=", 1)[1] for o in row["overrides"] if o.startswith("net="))
            fields, metrics = row["fields"], row["metrics"]
            gflops, images = fields["gflops_per_forward"], fields["train_images"]
            records.append(
                {
                    "space": space,
                    "net": net,
                    "family": "DiT" if net.startswith("dit") else "UNet",
                    "status": row["status"],
                    "params_m": None if fields["params"] is None else fields["params"] / 1e6,
                    "gflops_per_forward": gflops,
                    # DiT's training compute: Gflops x 3 (forward + backward) x images, here in Tflops
                    "train_tflops": None if gflops is None or not images else 3 * gflops * images / 1e3,
                    "train_images_per_s": fields["train_images_per_s"],
                    "wall_time_min": None if fields["wall_time_s"] is None else fields["wall_time_s"] / 60,
                    "fid": metrics.get("final/fid_fmnist_cls"),
                    "kid": metrics.get("final/kid_fmnist_cls"),
                    "val_loss": metrics.get("val/loss"),
                    "job_dir": _relative(sweep_dir(scale, space) / row["job"]),
                }
            )
    return records


def plot(records: list[dict[str, Any]], x_key: str, x_label: str, path: Path, title: str) -> None:
    """FID against ``x_key`` (log scale): colour = space, triangle = DiT, circle = UNet; dashed lines join the DiTs
    of one width in a space (their patch sizes), the paper's "smaller patches, more Gflops" axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = {"pixel": "tab:blue", "latent": "tab:orange"}
    done = [r for r in records if r["fid"] is not None and r[x_key] is not None]
    for r in done:
        ax.scatter(r[x_key], r["fid"], color=colors[r["space"]], marker="^" if r["family"] == "DiT" else "o", s=45)
        ax.annotate(r["net"], (r[x_key], r["fid"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for space, color in colors.items():
        widths = {r["net"].rstrip("0123456789") for r in done if r["space"] == space and r["family"] == "DiT"}
        for width in widths:
            line = sorted((r[x_key], r["fid"]) for r in done if r["space"] == space and r["net"][:-1] == width)
            ax.plot(*zip(*line, strict=True), color=color, linestyle="--", linewidth=0.8)
        ax.scatter([], [], color=color, label=f"{space} (triangle: DiT, circle: UNet)")
    ax.set_xscale("log")
    xs = [r[x_key] for r in done]
    if xs:
        ticks = [m * 10.0**e for e in range(-4, 5) for m in (1, 2, 5) if min(xs) / 1.5 <= m * 10.0**e <= max(xs) * 1.5]
        ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(x_label)
    ax.set_ylabel("FID (fmnist_cls features) ↓")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_figure(records: list[dict[str, Any]], path: Path) -> None:
    """Each job's final sample grid (``samples/samples.png``, EMA weights, the study's sampler), a row per space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = list(dict.fromkeys(r["space"] for r in records))
    cols = max(sum(r["space"] == s for r in records) for s in spaces)
    fig, axes = plt.subplots(len(spaces), cols, figsize=(2.2 * cols, 2.4 * len(spaces)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, space in enumerate(spaces):
        rows = sorted((r for r in records if r["space"] == space), key=lambda r: r["gflops_per_forward"] or 0.0)
        for j, r in enumerate(rows):
            grid = ROOT / r["job_dir"] / "samples" / "samples.png"
            if grid.is_file():
                axes[i, j].imshow(plt.imread(grid), cmap="gray")
            fid = "" if r["fid"] is None else f", FID {r['fid']:.1f}"
            axes[i, j].set_title(f"{space}: {r['net']}{fid}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(records: list[dict[str, Any]]) -> str:
    header = [
        "space",
        "net",
        "params (M)",
        "Gflops/forward",
        "train Tflops",
        "train images/s",
        "FID",
        "KID",
        "val loss",
    ]
    rows = [
        [r["space"], r["net"], r["params_m"], r["gflops_per_forward"], r["train_tflops"], r["train_images_per_s"]]
        + [r["fid"], r["kid"], r["val_loss"]]
        for r in sorted(records, key=lambda r: (r["space"] != "pixel", r["gflops_per_forward"] or 0.0))
    ]
    return markdown_table(header, rows)


def report(scale: str) -> None:
    records = results(scale)
    label = "CPU scale" if scale == "cpu" else "GPU"
    write_json(OUT / f"results_{scale}.json", {"hardware": hardware(), "records": records})
    setting = dict(o.split("=", 1) for o in COMMON[scale] if "=" in o)
    budget = f"{label}: every net {setting['trainer.max_steps']} steps of {setting['data.batch_size']}"
    x_gflops = "Gflops per forward (multiply-adds, DiT's count)"
    plot(records, "gflops_per_forward", x_gflops, OUT / f"fid_vs_gflops_{scale}.png", f"{budget}: FID vs Gflops")
    x_compute = "training compute (Tflops = Gflops x 3 x training images)"
    plot(records, "train_tflops", x_compute, OUT / f"fid_vs_compute_{scale}.png", f"{budget}: FID vs compute")
    sample_figure(records, OUT / f"samples_{scale}.png")
    print(table(records))
    print(json.dumps({"commands": {s: " ".join(sweep_command(scale, s)) for s in SPACES[scale]}}, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=list(COMMON), default="cpu")
    p.add_argument("--space", choices=["pixel", "latent", "all"], default="all")
    p.add_argument("--report", action="store_true", help="only read the sweeps and write table, json and plots")
    args = p.parse_args()
    if not args.report:
        for space in SPACES[args.scale] if args.space == "all" else [args.space]:
            run_sweep(args.scale, space)
    report(args.scale)


if __name__ == "__main__":
    main()

"""Plots and markdown tables of ``results_<tag>.json`` (experiments/score_sde/run.py).

python experiments/score_sde/plot.py --tag cpu    # writes fid_vs_nfe_<tag>.png, pc_<tag>.png, nll_<tag>.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from experiments.common import ROOT, markdown_table  # noqa: E402

HERE = ROOT / "experiments" / "score_sde"  # where results_<tag>.json is read and the plots go


def fid_key(rows: list[dict]) -> str:
    return next(k for k in rows[0] if k.startswith("fid_"))


def plot_nfe(rows: list[dict], key: str, out: Path, plt) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        for family, marker in (("heun", "o-"), ("dpmpp_2m", "s--")):
            cells = sorted((r["nfe"], r[key]) for r in rows if r["model"] == model and r["sampler"].startswith(family))
            if cells:
                ax.plot(*zip(*cells, strict=True), marker, label=f"{model}, {family}")
    ax.set(xlabel="NFE", ylabel=key, yscale="log", title="FID against NFE (16x16 Fashion-MNIST, CPU scale)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_bars(rows: list[dict], value: str, error: str | None, out: Path, title: str, plt) -> None:
    """Horizontal bars, one per row (model, sampler), grouped by model."""
    rows = sorted(rows, key=lambda r: r["model"])
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    labels = [f"{r['model']}: {r['sampler']}" for r in rows]
    ax.barh(range(len(rows)), [r[value] for r in rows], xerr=[r[error] for r in rows] if error else None)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=value, title=title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser()
    p.add_argument("--tag", default="cpu")
    args = p.parse_args(argv)
    rows = json.loads((HERE / f"results_{args.tag}.json").read_text())["rows"]
    parts = {part: [r for r in rows if r["part"] == part] for part in ("nfe", "pc", "nll")}
    if parts["nfe"]:
        key = fid_key(parts["nfe"])
        plot_nfe(parts["nfe"], key, HERE / f"fid_vs_nfe_{args.tag}.png", plt)
        print(
            markdown_table(
                ["model", "sampler", "NFE", key], [[r["model"], r["sampler"], r["nfe"], r[key]] for r in parts["nfe"]]
            )
        )
    if parts["pc"]:
        key = fid_key(parts["pc"])
        plot_bars(parts["pc"], key, None, HERE / f"pc_{args.tag}.png", "equal NFE: P, C, PC, Langevin", plt)
        print(
            markdown_table(
                ["model", "sampler", "NFE", key], [[r["model"], r["sampler"], r["nfe"], r[key]] for r in parts["pc"]]
            )
        )
    if parts["nll"]:
        plot_bars(parts["nll"], "bpd", "bpd_se", HERE / f"nll_{args.tag}.png", "bits/dim (± s.e.)", plt)
        header = ["model", "likelihood", "bits/dim", "s.e.", "NFE", "rtol", "images", "seconds"]
        names = {"ode": "PF-ODE", "vlb": "VLB (bound)"}
        table = [
            [r["model"], names[r["sampler"]], r["bpd"], r["bpd_se"], r["nfe"], f"{r['rtol']:g}" if r["rtol"] else "—"]
            + [r["images"], r["seconds"]]
            for r in parts["nll"]
        ]
        print(markdown_table(header, table))


if __name__ == "__main__":
    main()

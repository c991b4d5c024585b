"""The studies' headline cells rescored with two feature networks: does a stronger Fashion-MNIST classifier change
any study's ordering?

    OMP_NUM_THREADS=1 python experiments/feature_net_v2/rescore.py          # the run of RESULTS.md
    python experiments/feature_net_v2/rescore.py --only iddpm cfg --seed 1000 --tag seed1000   # other noise

Every cell (study, label, checkpoint under ``--logs``, sampler) draws ``--num-samples`` images ONCE (batch b from the
generator seeded ``--seed`` + b, the same noise for every cell of a model) and computes, on those very images, FID
against ``--num-real`` Fashion-MNIST test images and IS with each of ``--nets`` (default: the shipped ``fmnist_cls``,
v1, 86.2 % test accuracy, and ``fmnist_cls_v2``), and for class-conditional cells the class accuracy each net
gives the requested labels. The floor of each resolution is the FID of ``--num-samples`` test images themselves.
The checkpoints are those the studies trained (their ``logs/`` layout); a missing one is skipped with a message.
Sample sets are kept in ``logs/feature_net_v2/samples/``, so another net rescores them without sampling again.
Results go to ``results_rescore[_<tag>].json`` after every cell (a rerun skips the cells already there), then a
markdown table with each cell's FID rank within its study under every net.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.metrics import load_classifier  # noqa: E402
from experiments.common import ROOT, hardware, load, markdown_table, real_metrics, write_json  # noqa: E402
from experiments.guidance_editing.cascade import draw as cascade_draw  # noqa: E402
from experiments.sampler_nfe.run import generate, sampler_factory  # noqa: E402

OUT = Path(__file__).parent
NETS = ["fmnist_cls", "fmnist_cls_v2"]


class Cell(NamedTuple):
    """One sample set: ``sampler`` (conf/sampler/<name>.yaml) with ``options`` and ``steps`` on ``ckpt`` (a run dir or
    a .ckpt file under --logs), CFG weight ``w`` for class-conditional models; with ``upscaler`` (the same), the
    samples are then upscaled at ``aug_level`` (DDIM-50, as experiments/guidance_editing/cascade.py)."""

    study: str
    label: str
    ckpt: str
    sampler: str = "ddim"
    steps: int = 50
    options: dict[str, Any] = {}  # noqa: RUF012 (never mutated)
    w: float | None = None
    upscaler: str | None = None
    aug_level: int = 50


SIMPLE, HYBRID = "iddpm_nll/cpu/simple", "iddpm_nll/cpu/hybrid"
ARCH = [("pixel", i, n) for i, n in enumerate(["unet_s", "dit_xs4", "dit_xs2", "dit_ss4", "dit_ss2"])]
ARCH += [("latent", i, n) for i, n in enumerate(["unet_latent32", "dit_xs2", "dit_xs1", "dit_ss2", "dit_ss1"])]
CELLS = [
    # iddpm_nll: fixed vs learned variance, 50 respaced ancestral steps (its "FID 50 steps" column)
    Cell("iddpm_nll", "L_simple, fixed β̃_t", SIMPLE, "ddpm", 50, {"variance_type": "fixed_small"}),
    Cell("iddpm_nll", "L_simple, fixed β_t", SIMPLE, "ddpm", 50, {"variance_type": "fixed_large"}),
    Cell("iddpm_nll", "L_hybrid, learned Σ", HYBRID, "ddpm", 50),
    # sampler_nfe: a solver at 10 NFE against DDIM at 10 and 50 (the L_simple model)
    Cell("sampler_nfe", "ddim, NFE 10", SIMPLE, "ddim", 10),
    Cell("sampler_nfe", "dpmpp_2m, NFE 10", SIMPLE, "dpmpp_2m", 10),
    Cell("sampler_nfe", "ddim, NFE 50", SIMPLE, "ddim", 50),
    # ddim_table: η = 0 against η = 1 with the paper's τ at S = 10 and 50 (the L_simple model)
    *(
        Cell("ddim_table", f"η = {eta:g}, S = {s}", SIMPLE, "ddim", s, {"eta": eta, "spacing": "ddim_uniform"})
        for s in (10, 50)
        for eta in (0.0, 1.0)
    ),
    # cfg_tradeoff's question on classifier_guidance's CFG model (DDIM 25 steps, as its cfg rows)
    *(Cell("cfg", f"w = {w:g}", "guidance_editing/cfg_model", "ddim", 25, w=w) for w in (0.0, 1.0, 3.0)),
    # sampler_nfe's guidance table: w = 3, DDIM-50 with and without the static clip (its CFG model)
    *(
        Cell("sampler_nfe, w = 3", f"DDIM-50, {name}", "sampler_nfe/cfg", "ddim", 50, {"clip_denoised": clip}, 3.0)
        for name, clip in (("static clip", True), ("no thresholding", False))
    ),
    # arch_sweep: every net of both spaces, DDIM 25 steps (as the sweep's own FID)
    *(Cell(f"arch_sweep {space}", net, f"arch_sweep/cpu/{space}/{i}", "ddim", 25) for space, i, net in ARCH),
    # rectified_flow: DDPM+DDIM, 1-RF and 2-RF at 1 and 50 steps
    *(
        Cell("rectified_flow", f"{label}, {s} step{'s' * (s > 1)}", f"rectified_flow/cpu/{run}", sampler, s)
        for run, label, sampler in (("ddpm", "DDPM + DDIM", "ddim"), ("rf1", "1-RF", "flow_euler"))
        + (("rf2", "2-RF", "flow_euler"),)
        for s in (1, 50)
    ),
    # cascade: the single 16x16 model (iddpm_nll's L_simple model, copied as guidance_editing/cpu/base16) against
    # base 8x8 → upscaler at aug levels 50 and 0, DDIM-50 everywhere (RESULTS_cascade.md's full CPU run)
    Cell("cascade", "single 16x16 model", SIMPLE),
    *(
        Cell(
            "cascade",
            f"base 8x8 → upscaler, aug level {level}",
            "guidance_editing/cpu/base8/checkpoints/last-v1.ckpt",
            upscaler="guidance_editing/cpu/upscaler8to16/checkpoints/last-v1.ckpt",
            aug_level=level,
        )
        for level in (50, 0)
    ),
]


def checkpoint(logs: Path, path: str) -> Path:
    """A run dir's checkpoints/last.ckpt, or the file itself."""
    p = logs / path
    return p if p.suffix == ".ckpt" else p / "checkpoints" / "last.ckpt"


def draw(cell: Cell, models: dict, args, device, logs: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cell's images and the requested labels (None if unconditional), kept in ``logs``/feature_net_v2/samples/
    under a hash of the cell's sampling, the count, the seed and the checkpoints' size and time: a cell of two studies
    is drawn once, and another feature net rescores without sampling again (delete the folder to redraw)."""
    key = {**cell._asdict(), "num_samples": args.num_samples, "seed": args.seed}
    for c in filter(None, (cell.ckpt, cell.upscaler)):
        stat = os.stat(checkpoint(logs, c))
        key[c] = [stat.st_size, stat.st_mtime]
    del key["study"], key["label"]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = logs / "feature_net_v2" / "samples" / f"{digest}.pt"
    if path.is_file():
        return torch.load(path)
    module = models[cell.ckpt][0]
    sampler = module.build_sampler(sampler_factory(cell.sampler, **cell.options, steps=cell.steps))
    num, batch = args.num_samples, args.batch_size
    images, _ = generate(module, sampler, cell.steps, num, batch, device, w=cell.w, seed=args.seed)
    if cell.upscaler:
        upscaler = models[cell.upscaler][0]
        images = cascade_draw(upscaler, len(images), args.batch_size, device, args.seed + 10**6, images, cell.aug_level)
    labels = torch.arange(len(images)) % module.num_classes if module.num_classes else None
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save((images.cpu(), labels), path)
    return images, labels


def score(images: torch.Tensor, scorers: dict, judges: dict, labels: torch.Tensor | None) -> dict[str, float]:
    """FID and IS on every net (and class accuracy when ``labels`` are given)."""
    out: dict[str, float] = {}
    for net, gm in scorers.items():
        gm.update_fake(images)
        out.update(gm.compute())
        if labels is not None:
            with torch.no_grad():
                predicted = judges[net](images).argmax(1).cpu()
            out[f"accuracy_{net}"] = (predicted == labels).float().mean().item()
    return out


def floor_row(test, num: int, scorers: dict, judges: dict, device) -> dict[str, Any]:
    """The FID floor at ``num`` samples: the first ``num`` test images themselves (and the nets' accuracy on them)."""
    first = [test[i] for i in range(min(num, len(test)))]
    images, labels = torch.stack([x for x, _ in first]), torch.tensor([int(y) for _, y in first])
    row = {"study": "floor", "cell": f"{len(first)} test images, {'x'.join(map(str, images.shape[1:]))}"}
    return {**row, **score(images.to(device), scorers, judges, labels)}


def ranks(rows: list[dict], key: str) -> dict[tuple[str, str], int]:
    """1 = the lowest ``key`` within each study."""
    out = {}
    for study in {r["study"] for r in rows}:
        members = sorted((r for r in rows if r["study"] == study), key=lambda r: r[key])
        out.update({(r["study"], r["cell"]): i + 1 for i, r in enumerate(members)})
    return out


def table(rows: list[dict], nets: list[str]) -> str:
    cells = [r for r in rows if r["study"] != "floor"]
    rank = {net: ranks(cells, f"fid_{net}") for net in nets}
    header = ["study", "cell", *(f"FID {n}" for n in nets), *(f"IS {n}" for n in nets), *(f"rank {n}" for n in nets)]
    body = []
    for r in rows:
        key = (r["study"], r["cell"])
        body.append(
            [
                *key,
                *(r[f"fid_{n}"] for n in nets),
                *(r[f"is_{n}"] for n in nets),
                *(rank[n].get(key, "—") for n in nets),
            ]
        )
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", nargs="+", default=NETS, help="feature nets (metrics.feature_net names)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--num-real", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, help="studies whose name starts with one of these")
    p.add_argument("--logs", default=str(ROOT / "logs"), help="where the studies' run dirs are")
    p.add_argument("--tag", default="", help="results_rescore_<tag>.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device, logs = torch.device(args.device), Path(args.logs)
    out = OUT / f"results_rescore{'_' + args.tag if args.tag else ''}.json"
    settings = {k: getattr(args, k) for k in ("nets", "num_samples", "num_real", "seed")}
    payload: dict[str, Any] = {"hardware": hardware(), "settings": settings, "rows": []}
    if out.is_file() and json.loads(out.read_text())["settings"] == settings:
        payload["rows"] = json.loads(out.read_text())["rows"]  # resume: keep the cells already scored
    done = {(r["study"], r["cell"]) for r in payload["rows"]}
    payload["test_accuracy"] = {net: load_classifier(net)[1]["test_accuracy"] for net in args.nets}
    judges = {net: load_classifier(net)[0].to(device) for net in args.nets}
    scorers: dict[tuple, dict] = {}  # test set → {net: GenerativeMetrics with its real statistics}
    models: dict[str, Any] = {}  # run dir → (module, record, test set)
    for cell in CELLS:
        if args.only and not cell.study.startswith(tuple(args.only)) or (cell.study, cell.label) in done:
            continue
        paths = [cell.ckpt] + ([cell.upscaler] if cell.upscaler else [])
        missing = [str(checkpoint(logs, c)) for c in paths if not checkpoint(logs, c).is_file()]
        if missing:
            print(f"skipped {cell.study} / {cell.label}: no checkpoint {missing}", flush=True)
            continue
        for c in paths:
            models.setdefault(c, load(checkpoint(logs, c), device))
        images, labels = draw(cell, models, args, device, logs)
        _, record, test = models[cell.upscaler or cell.ckpt]
        key = (type(test).__name__, len(test), tuple(test[0][0].shape))
        if key not in scorers:  # real statistics of this test set, and its floor
            cache = {"data": record["config"]["data"]}
            scorers[key] = {n: real_metrics(test, args.num_real, ("fid", "is"), n, device, cache) for n in args.nets}
            row = floor_row(test, args.num_samples, scorers[key], judges, device)
            if (row["study"], row["cell"]) not in done:
                payload["rows"].append(row)
        row = {"study": cell.study, "cell": cell.label, **score(images.to(device), scorers[key], judges, labels)}
        row["spec"] = {k: v for k, v in cell._asdict().items() if k not in ("study", "label")}
        print(row, flush=True)
        payload["rows"].append(row)
        write_json(out, payload)  # after every cell: a stopped run keeps its rows
    print(table(payload["rows"], args.nets))


if __name__ == "__main__":
    main()

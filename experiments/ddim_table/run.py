"""The DDIM paper's Table 1 (FID vs η and S) for a model trained with this platform.

    python experiments/ddim_table/run.py                    # the CPU run recorded in RESULTS.md
    python experiments/ddim_table/run.py --num-samples 10000 --num-real 10000 --steps 10 20 50 100 1000 \\
        --train "data=fashion_mnist trainer=gpu"            # the full-size run on a GPU

One model (trained by src/train.py if its checkpoint is missing), DDIM with η ∈ {0, 0.2, 0.5, 1} and σ̂ (DDPM with
σ̂² = 1 − ᾱ_t/ᾱ_prev around the posterior mean, as the paper's code), S sampling steps on the DDIM paper's uniform
spacing (ddim_uniform), the same initial noise for every cell. FID is the offline proxy FID on the penultimate
features of difflab's Fashion-MNIST classifier (fid_fmnist_cls), NOT comparable to Inception FIDs.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.samplers import DDIMSampler, Spacing, spaced_timesteps
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

ROWS = [
    ("0.0", dict(eta=0.0)),
    ("0.2", dict(eta=0.2)),
    ("0.5", dict(eta=0.5)),
    ("1.0", dict(eta=1.0)),
    ("σ̂", dict(sigma="hat")),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--train",
        default="experiment=quickstart trainer.max_steps=1500 callbacks.ema.warmup=false",  # EMA as recorded
        help="src/train.py overrides",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="none", help="training overrides put before --train")
    p.add_argument("--run-dir", default=str(ROOT / "logs" / "ddim_table" / "model"))
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
    p.add_argument("--rows", nargs="+", choices=[name for name, _ in ROWS], default=[name for name, _ in ROWS])
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--num-real", type=int, default=1000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--spacing",
        choices=[s.value for s in Spacing],
        default="ddim_uniform",
        help="τ (ddim_uniform: the paper's; the same steps as leading for S that divide T)",
    )
    p.add_argument("--tag", default="", help="results_<tag>.json and fid_vs_steps_<tag>.png (default: no suffix)")
    p.add_argument("--update", action="store_true", help="replace only these rows in the existing results_<tag>.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ckpt = ensure_checkpoint(Path(args.run_dir), PRESETS[args.preset] + args.train.split())
    module, record, test = load(ckpt, device)
    module.sample_batch_size = 1000 if device.type == "cuda" else 250
    gm = real_metrics(test, args.num_real, ("fid",), "fmnist_cls", device, {"data": record["config"]["data"]})
    table: dict[str, dict[int, float]] = {}
    for name, kwargs in (row for row in ROWS if row[0] in args.rows):
        sampler = module.build_sampler(functools.partial(DDIMSampler, spacing=args.spacing, **kwargs))
        for steps in args.steps:
            start = time.time()
            with sampling_precision(device):
                images = module.sample(args.num_samples, torch.Generator(device).manual_seed(0), sampler, steps)
            gm.update_fake(images)
            table.setdefault(name, {})[steps] = gm.compute()["fid_fmnist_cls"]
            print(
                f"eta={name} S={steps} fid_fmnist_cls={table[name][steps]:.3f} ({time.time() - start:.0f}s)", flush=True
            )
    out, suffix = Path(__file__).parent, f"_{args.tag}" if args.tag else ""
    payload = {
        "table": table,
        "ckpt": str(ckpt),
        "global_step": record["global_step"],
        "num_samples": args.num_samples,
        "num_real": args.num_real,
        "hardware": hardware(),
        "train": " ".join(PRESETS[args.preset] + args.train.split()),
        "sampling_precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "steps": args.steps,
        "spacing": args.spacing,
    }
    if args.update:
        payload = merged(out / f"results{suffix}.json", payload, module.diffusion.num_timesteps)
    write_json(out / f"results{suffix}.json", payload)
    table, steps = payload["table"], payload["steps"]
    plot(table, steps, out / f"fid_vs_steps{suffix}.png")
    print(markdown_table(["η \\ S", *map(str, steps)], [[n, *(table[n][s] for s in steps)] for n in table]))


def merged(path: Path, new: dict, num_timesteps: int) -> dict:
    """``new``'s rows in place of the same rows of the results at ``path`` (``--update``): the other rows are kept,
    so the run must match them (the same training step, sample counts, steps and sampled timesteps)."""
    old = json.loads(path.read_text())
    for key in ("global_step", "num_samples", "num_real", "steps"):
        if old[key] != new[key]:
            raise ValueError(f"--update: {path.name} has {key}={old[key]!r}, this run {new[key]!r}")
    spacing = old.get("spacing", "leading")  # the default of the runs written before the key
    for steps in new["steps"]:
        before, now = (spaced_timesteps(num_timesteps, steps, s).tolist() for s in (spacing, new["spacing"]))
        if before != now:
            raise ValueError(f"--update: spacing {spacing} and {new['spacing']} differ at S={steps}")
    table = {name: {int(s): v for s, v in row.items()} for name, row in old["table"].items()}
    table.update(new["table"])
    rerun = {**old.get("rerun", {}), **{name: time.strftime("%Y-%m-%d") for name in new["table"]}}
    return {**old, "table": table, "rerun": rerun, "hardware_rerun": new["hardware"], "spacing": new["spacing"]}


def plot(table: dict[str, dict[int, float]], steps: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, row in table.items():
        ax.plot(steps, [row[s] for s in steps], marker="o", label=f"η = {name}" if name != "σ̂" else "σ̂")
    ax.set(xscale="log", yscale="log", xlabel="sampling steps S", ylabel="FID (fmnist_cls features)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

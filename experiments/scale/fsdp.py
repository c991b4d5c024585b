"""Study items 3 and 4 of issue 30: memory per process under DDP, FSDP and FSDP + activation checkpointing, measured
on 2 CPU processes (gloo) and planned for the GPU sizes; and the FSDP-vs-DDP loss curves.

    python experiments/scale/fsdp.py                 # all parts, CPU (≈ 10 minutes on 2 cores)
    python experiments/scale/fsdp.py --part curves   # or: memory, plan

Writes ``results_fsdp.json`` and ``fsdp_loss_curves.png`` here. Memory on a CPU is the resident set (RSS) of each
process, polled every 2 ms by :class:`PeakMemory` (a callback injected into ``src/train.py``): ``at start`` after
the sharding (freed memory handed back with ``malloc_trim``), ``peak`` the highest RSS during the training steps.
Their difference is what training adds on top of the resident weights and states: gradients, Adam's first-step
allocation and the activations. On a GPU the same comparison is ``torch.cuda.max_memory_allocated`` (the GPU
command is in RESULTS.md).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from experiments.common import ROOT, hardware, markdown_table, write_json  # noqa: E402

HERE = ROOT / "experiments" / "scale"
MIB = 1024**2


class PeakMemory(pl.Callback):
    """RSS of this process at the start of training and its peak during training (on a GPU also
    ``torch.cuda.max_memory_allocated``), to ``<out>/memory_rank<r>.json``."""

    def __init__(self, out: str) -> None:
        self.out, self.peak, self.running = Path(out), 0, False

    def _poll(self) -> None:
        process = psutil.Process()
        while self.running:
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(0.002)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the full model built before sharding: freed, handed back
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.start = psutil.Process().memory_info().rss
        self.peak, self.running = self.start, True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.running = False
        self.thread.join()
        record = {"rank": trainer.global_rank, "start_mib": self.start / MIB, "peak_mib": self.peak / MIB}
        if torch.cuda.is_available():  # on a GPU, the memory that matters
            record["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MIB
        (self.out / f"memory_rank{trainer.global_rank}.json").write_text(json.dumps(record))


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "src" / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return proc


# DiT-B/2 (130M parameters) on 32x32 Fashion-MNIST: 256 tokens, as DiT on 256² images' 32x32x4 latents
MEMORY_RUN = [
    "model=ddpm",
    "net=dit_b2",
    "data.image_size=32",
    "data.batch_size=4",
    "data.limit_train_size=64",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=0",
    "trainer.num_sanity_val_steps=0",
    "callbacks.sample_grid=null",
    "callbacks.model_checkpoint=null",
    "samples.num_samples=0",
    "logger=none",
]
SETTINGS = {
    "DDP": ["trainer=ddp_cpu"],
    "FSDP": ["trainer=fsdp_cpu"],
    "FSDP + checkpointing": ["trainer=fsdp_cpu", "net.checkpointing=true"],
}


def memory(work: Path) -> list[dict]:
    rows = []
    for name, overrides in SETTINGS.items():
        run_dir = work / name.replace(" ", "").replace("+", "_")
        probe = [f"+callbacks.probe._target_={__name__.replace('__main__', 'experiments.scale.fsdp')}.PeakMemory",
                 f"+callbacks.probe.out={run_dir}"]  # fmt: skip
        started = time.perf_counter()
        train(run_dir, *MEMORY_RUN, *overrides, *probe)
        ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("memory_rank*.json"))]
        planned = plan_of([*MEMORY_RUN, *overrides, "trainer.precision=32-true"])
        rows.append({
            "setting": name,
            "start_mib": max(r["start_mib"] for r in ranks),
            "peak_mib": max(r["peak_mib"] for r in ranks),
            "added_mib": max(r["peak_mib"] - r["start_mib"] for r in ranks),
            "planned_total_mib": planned["total"] / MIB,
            "planned_activations_mib": planned["bytes"]["activations"] / MIB,
            "wall_s": time.perf_counter() - started,
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plan_of(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from difflab.tasks.plan import memory_plan
    from difflab.utils.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return memory_plan(compose("train", overrides=overrides))


GPU_PLANS = {  # DiT-XL/2 on ImageNet-256 latents (32x32x4), 1000 classes, 8 GPUs, batch 32 per GPU (256 global)
    "DDP": ["trainer=ddp"],
    "FSDP": ["trainer=fsdp"],
    "FSDP + checkpointing": ["trainer=fsdp", "net.checkpointing=true"],
}
XL = ["model=ddpm", "net=dit_xl2", "model.image_shape=[4,32,32]", "model.num_classes=1000", "trainer.devices=8"]


def gpu_plans() -> list[dict]:
    rows = []
    for batch in (32, 256):
        for name, overrides in GPU_PLANS.items():
            planned = plan_of([*XL, f"data.batch_size={batch}", *overrides])
            rows.append({"setting": name, "batch_per_gpu": batch, **{k: v / 2**30 for k, v in planned["bytes"].items()},
                         "total_gib": planned["total"] / 2**30})  # fmt: skip
    return rows


CURVE_RUN = [
    "experiment=quickstart",
    "net=dit_tiny",
    "data.limit_train_size=2048",
    "data.batch_size=32",
    "trainer.max_steps=60",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=1",
    "callbacks.sample_grid=null",
    "samples.num_samples=0",
    "logger=csv",
]


def curves(work: Path) -> dict:
    result = {}
    for name in ("ddp_cpu", "fsdp_cpu"):
        run_dir = work / f"curve_{name}"
        train(run_dir, *CURVE_RUN, f"trainer={name}")
        rows = csv.DictReader(next((run_dir / "csv").rglob("metrics.csv")).open())
        result[name] = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    steps = sorted(result["ddp_cpu"])
    diffs = [abs(result["ddp_cpu"][s] - result["fsdp_cpu"][s]) for s in steps]
    return {"steps": steps, "ddp": [result["ddp_cpu"][s] for s in steps],
            "fsdp": [result["fsdp_cpu"][s] for s in steps], "max_abs_diff": max(diffs)}  # fmt: skip


def plot_curves(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True, height_ratios=[3, 1])
    top.plot(data["steps"], data["ddp"], "o-", ms=3, label="DDP (2 CPU processes)")
    top.plot(data["steps"], data["fsdp"], "x--", ms=4, label="FSDP (2 CPU processes)")
    top.set(ylabel="train/loss", title="DiT-tiny, 16x16 Fashion-MNIST, same seed and batches")
    top.legend()
    bottom.plot(data["steps"], [abs(a - b) for a, b in zip(data["ddp"], data["fsdp"], strict=True)], ".-")
    bottom.set(xlabel="step", ylabel="|DDP − FSDP|")
    fig.tight_layout()
    fig.savefig(HERE / "fsdp_loss_curves.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "memory", "plan", "curves"], default="all")
    parser.add_argument("--work", type=Path, default=ROOT / "logs" / "scale_study")
    args = parser.parse_args()
    path = HERE / "results_fsdp.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["hardware"] = hardware()
    if args.part in ("all", "curves"):
        results["curves"] = curves(args.work)
        plot_curves(results["curves"])
    if args.part in ("all", "memory"):
        results["memory_cpu"] = memory(args.work)
    if args.part in ("all", "plan"):
        results["plan_gpu"] = gpu_plans()
    write_json(path, results)
    if "memory_cpu" in results:
        header = ["setting", "RSS at start (MiB)", "peak RSS (MiB)", "added in training", "plan: total", "plan: act."]
        keys = ("start_mib", "peak_mib", "added_mib", "planned_total_mib", "planned_activations_mib")
        table = [[r["setting"], *(f"{r[k]:.0f}" for k in keys)] for r in results["memory_cpu"]]
        print(markdown_table(header, table))
    if "curves" in results:
        print(f"loss curves: max |DDP − FSDP| over {len(results['curves']['steps'])} steps = "
              f"{results['curves']['max_abs_diff']:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()

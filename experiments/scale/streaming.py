"""CPU benchmark of ``data=streaming`` (issue 30): images/s of iterating the training loader of the in-memory
Fashion-MNIST module vs the streaming module over LitData shards of the same images (a local folder, and the same
folder as ``local:DIR``, litdata's object-store path: chunks copied into a cache first), batch 128, 0 and 2 loader
workers.

    python experiments/scale/streaming.py                    # ~2 min on 2 cores
    python experiments/scale/streaming.py --batches 400 --repeats 5 --image-size 16 --threads 2

Each measurement builds a fresh data module (as a training run does), then times ``--batches`` batches of its
train loader after ``--warmup`` untimed ones (a worker's start-up and the first reads are in the warm-up; the time
to the first batch is reported apart). The loaders yield the same batches in the same order (checked on the first
batch). Configurations alternate within each of ``--repeats`` rounds so that load from other processes hits all
alike; the table shows the medians. Writes ``experiments/scale/results_streaming.json`` and prints a markdown table;
the shards go to ``logs/scale/streaming/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from difflab.data import FashionMNISTDataModule, StreamingDataModule  # noqa: E402
from difflab.data.shards import write_shards  # noqa: E402
from difflab.utils.paths import write_text_atomic  # noqa: E402
from experiments.common import markdown_table  # noqa: E402

OUT = Path(__file__).resolve().parent / "results_streaming.json"
WORK = ROOT / "logs" / "scale" / "streaming"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process (workers: 1)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--out", default=str(OUT))
    return parser.parse_args()


def write(args: argparse.Namespace) -> tuple[Path, dict]:
    """The train split as shards (LitData's writer in this process, 64 MB chunks); seconds and size."""
    shards = WORK / f"fashion_mnist_{args.image_size}"
    shutil.rmtree(shards, ignore_errors=True)
    source = FashionMNISTDataModule(args.data_dir, image_size=args.image_size, on_device=False)
    source.setup()
    start = time.perf_counter()
    manifest = write_shards({"train": source.train}, shards, num_classes=10)
    seconds = time.perf_counter() - start
    return shards, {"write_seconds": round(seconds, 2), **manifest["splits"]["train"]}


def build(mode: str, workers: int, args: argparse.Namespace, shards: Path, cache: Path):
    common = {"image_size": args.image_size, "batch_size": args.batch_size, "num_workers": workers}
    if mode == "in-memory":
        return FashionMNISTDataModule(args.data_dir, on_device=False, **common)
    if mode == "streaming, local dir":
        return StreamingDataModule(input_dir=str(shards), **common)
    shutil.rmtree(cache, ignore_errors=True)  # each measurement starts with an empty cache, as a first epoch does
    return StreamingDataModule(input_dir=f"local:{shards}", cache_dir=str(cache), **common)


def measure(mode: str, workers: int, args: argparse.Namespace, shards: Path, cache: Path) -> dict:
    """Seconds to the first batch (module set-up, workers' start, first reads) and images/s after the warm-up."""
    start = time.perf_counter()
    dm = build(mode, workers, args, shards, cache)
    batches = iter(dm.train_dataloader())
    first = next(batches)
    first_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        next(batches)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    seconds = time.perf_counter() - start
    del batches  # stops the workers
    checksum = float(first[0].double().sum() + first[1].sum())
    return {"first_batch_s": first_s, "images_per_s": args.batches * args.batch_size / seconds, "checksum": checksum}


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)  # 2 threads on 2 shared cores stall whenever another process holds one
    shards, written = write(args)
    modes = ["in-memory", "streaming, local dir", "streaming, local: URI (cache)"]
    configs = [(m, w) for w in args.workers for m in modes]
    runs: dict[str, list[dict]] = {f"{m} | {w}": [] for m, w in configs}
    for _ in range(args.repeats):
        for mode, workers in configs:
            runs[f"{mode} | {workers}"].append(measure(mode, workers, args, shards, WORK / "cache"))
    checksums = {r["checksum"] for rs in runs.values() for r in rs}
    assert len(checksums) == 1, f"the loaders' first batches differ: {checksums}"
    rows, results = [], []
    for key, rs in runs.items():
        mode, workers = key.split(" | ")
        median = {k: statistics.median(r[k] for r in rs) for k in ("images_per_s", "first_batch_s")}
        results.append({"mode": mode, "num_workers": int(workers), **median, "runs": rs})
        rows.append([mode, workers, round(median["images_per_s"]), round(median["first_batch_s"], 2)])
    base = {r["num_workers"]: r["images_per_s"] for r in results if r["mode"] == "in-memory"}
    for row, result in zip(rows, results, strict=True):
        row.append(f"{result['images_per_s'] / base[result['num_workers']]:.2f}x")
    table = markdown_table(["loader", "num_workers", "images/s", "first batch (s)", "vs in-memory"], rows)
    record = {
        "command": "python " + " ".join(sys.argv),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "litdata": __import__("litdata").__version__},
        "shards": written,
        "results": results,
        "table": table,
    }
    write_text_atomic(args.out, json.dumps(record, indent=2) + "\n")
    print(table)
    size = f"{written['items']} images, {written['bytes'] / 1e6:.1f} MB"
    print(f"\nshards: {size}, written in {written['write_seconds']} s")


if __name__ == "__main__":
    main()

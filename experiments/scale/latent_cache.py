"""CPU benchmark of the latent cache (issue 30): LDM training images/s encoding every batch on the fly vs reading the
posterior moments from a cache written once by ``src/encode.py``.

    python experiments/scale/latent_cache.py                          # ~1.5 min on 2 idle cores
    python experiments/scale/latent_cache.py --steps 300 --threads 1
    python experiments/scale/latent_cache.py --lightning-repeats 1    # also whole src/train.py runs (+~30 s)

Both modes train the same model (``experiment=ldm scale=cpu``: the shipped kl-f4 stage 1, unet_s on 8x8x3 latents,
class-conditional, batch 64, fused Adam), two copies from the same initial weights, on the same
``--limit-train-size`` Fashion-MNIST 32x32 training images in the same (seed, epoch) order. A training step here is
what Lightning's step does for this model: the next batch from the data module's train loader, ``training_step``
(encoding, or the cached moments; the posterior sample; the diffusion loss), backward and the optimizer step. The
two modes alternate step by step (A B B A ...) in one process, so that load from other processes on a shared machine
hits both alike (on 2 cores, a 2-thread step slows down ~10x while another process holds a core); the table gives
images/s from the median step time and from the mean. ``--lightning-repeats N`` adds N whole ``src/train.py`` runs
per mode (Lightning's loop and the EMA update included; ``run_summary.json``'s images/s). The one-time cost, the
encode of the training and validation images, is timed too. Writes ``experiments/scale/results_latent_cache.json``
and prints a markdown table; the cache and the runs go to ``logs/scale/latent_cache/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from difflab.tasks.encode import encode  # noqa: E402
from difflab.utils.config import register_resolvers  # noqa: E402
from difflab.utils.paths import write_text_atomic  # noqa: E402
from experiments.common import markdown_table  # noqa: E402

OUT = Path(__file__).resolve().parent / "results_latent_cache.json"
WORK = ROOT / "logs" / "scale" / "latent_cache"
VAL_SIZE = 512  # scale=cpu's: the on-the-fly split, so that both modes train on the same images
BATCH = 64  # scale=cpu's
MODES = ("on the fly", "cached latents")


def config(overrides: list[str], name: str = "train") -> Any:
    """``conf/<name>.yaml`` composed as the command line would, paths under the repository."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.hydra.runtime.output_dir = str(WORK)
    HydraConfig().set_config(cfg)
    return cfg


def data_overrides(mode: str, limit: int, cache: Path) -> list[str]:
    if mode == "cached latents":
        return ["data=latents", f"data.cache_dir={cache}"]
    return [f"data.limit_train_size={limit}", f"data.val_size={VAL_SIZE}"]


def encode_cache(cache: Path, limit: int) -> dict[str, Any]:
    """Encode the training and validation images once (the one-time cost)."""
    shutil.rmtree(cache, ignore_errors=True)
    data = ["data=fashion_mnist", "data.image_size=32", f"data.limit_train_size={limit}", f"data.val_size={VAL_SIZE}"]
    result = encode(config([*data, "splits=[train,val]", f"out_dir={cache}", "progress=false"], "encode"))
    images = sum(entry["count"] for entry in result["manifest"]["splits"].values())
    seconds = result["manifest"]["encode"]["seconds"]
    return {"images": images, "seconds": seconds, "images_per_s": round(images / seconds, 1)}


def batches(datamodule: Any) -> Iterator[Any]:
    """The train loader's batches, epoch after epoch (epoch 0's order again: no trainer to count epochs)."""
    while True:
        yield from datamodule.train_dataloader()


def alternating_steps(limit: int, cache: Path, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each timed training step per mode, the modes alternating A B B A ... in this process."""
    torch.manual_seed(0)
    base = instantiate(config(["experiment=ldm", "scale=cpu", *data_overrides(MODES[0], limit, cache)]).model)
    base.log = lambda *args, **kwargs: None  # no trainer: logging is a no-op
    runs = {}
    for mode in MODES:
        datamodule = instantiate(config(["experiment=ldm", "scale=cpu", *data_overrides(mode, limit, cache)]).data)
        datamodule.setup("fit")
        if mode == "cached latents":
            base.check_latent_cache(cache, datamodule.manifest)
        model = copy.deepcopy(base).train()
        optimizer = model.configure_optimizers()["optimizer"]
        runs[mode] = (model, optimizer, batches(datamodule))
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for step in range(warmup + steps):
        for mode in MODES if step % 2 == 0 else MODES[::-1]:
            model, optimizer, data = runs[mode]
            start = time.perf_counter()
            loss = model.training_step(next(data), step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= warmup:
                times[mode].append(time.perf_counter() - start)
    return times


def lightning_run(mode: str, steps: int, limit: int, cache: Path, threads: int, repeat: int) -> float:
    """images/s of a whole ``src/train.py`` run (``run_summary.json``: after 10 warm-up steps)."""
    run_dir = WORK / f"lightning_{mode.replace(' ', '_')}_{repeat}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["experiment=ldm", "scale=cpu", f"trainer.max_steps={steps}", "trainer.limit_val_batches=0"]
    args += ["trainer.num_sanity_val_steps=0", "samples.num_samples=0", "callbacks.model_checkpoint=null"]
    args += ["logger=none", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DIFFLAB_ROOT": str(ROOT)}
    command = [sys.executable, "src/train.py", *args, *data_overrides(mode, limit, cache)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-4000:]}")
    return json.loads((run_dir / "run_summary.json").read_text())["train_images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="timed training steps per mode")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per mode first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS of the runs)")
    parser.add_argument("--limit-train-size", type=int, default=8192, help="training images (both modes)")
    parser.add_argument("--lightning-repeats", type=int, default=0, help="whole src/train.py runs per mode")
    parser.add_argument("--lightning-steps", type=int, default=100, help="steps of each src/train.py run")
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache, load = WORK / "cache", [os.getloadavg()[0]]
    encoded = encode_cache(cache, args.limit_train_size)
    times = alternating_steps(args.limit_train_size, cache, args.steps, args.warmup)
    load.append(os.getloadavg()[0])
    median = {m: BATCH / statistics.median(t) for m, t in times.items()}
    mean = {m: BATCH * len(t) / sum(t) for m, t in times.items()}
    lightning: dict[str, list[float]] = {m: [] for m in MODES}
    for repeat in range(args.lightning_repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            args_ = (mode, args.lightning_steps, args.limit_train_size, cache, args.threads, repeat)
            lightning[mode].append(lightning_run(*args_))
    load.append(os.getloadavg()[0])
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out")
    payload = {
        "command": f"python experiments/scale/latent_cache.py {flags}",
        "hardware": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, torch "
        f"{torch.__version__}",
        "load_average_1min": [round(x, 2) for x in load],  # at start, after the alternating steps, at the end
        "setup": f"experiment=ldm scale=cpu (shipped kl-f4, unet_s on 8x8x3 latents, class-conditional, batch {BATCH}),"
        f" Fashion-MNIST 32x32, {args.limit_train_size} training images",
        "encode_once": encoded,
        "step_seconds": {m: [round(s, 5) for s in t] for m, t in times.items()},
        "images_per_s_median_step": median,
        "images_per_s_mean": mean,
        "speedup_median_step": round(median[MODES[1]] / median[MODES[0]], 3),
        "speedup_mean": round(mean[MODES[1]] / mean[MODES[0]], 3),
        "lightning_images_per_s": lightning,
    }
    write_text_atomic(args.out, json.dumps(payload, indent=2) + "\n")
    header = ["LDM training step (CPU)", "timed steps", "batch", "images/s (median step)", "images/s (mean)"]
    rows = [[m, args.steps, BATCH, round(median[m], 1), round(mean[m], 1)] for m in MODES]
    rows.append(["speed-up", "", "", f"{payload['speedup_median_step']:.2f}x", f"{payload['speedup_mean']:.2f}x"])
    print(markdown_table(header, rows))
    if args.lightning_repeats:
        print("\nsrc/train.py runs, images/s: " + "; ".join(f"{m}: {lightning[m]}" for m in MODES))
    print(
        f"\none-time encode: {encoded['images']} images in {encoded['seconds']} s ({encoded['images_per_s']} images/s);"
        f" {payload['hardware']}; load average {payload['load_average_1min']}\nwrote {args.out}"
    )


if __name__ == "__main__":
    main()

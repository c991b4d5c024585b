"""Shared by the experiment scripts: load a checkpoint, real images of its data, FID/IS on a feature net."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from difflab.metrics import GenerativeMetrics
from difflab.modules import load_module
from difflab.utils.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]

# The short GPU preset of experiments/gpu_short.sh: Fashion-MNIST 32x32, a 64-channel unet_s (2 res blocks per
# level), bf16 training bounded by wall-clock time (3.25 minutes per model, several models side by side on one GPU),
# a checkpoint every 250 steps. A real study trains 100-800k steps; these runs show the shape, not the level.
GPU_SHORT = [
    "data=fashion_mnist",
    "trainer=gpu",
    "net=unet_s",
    "net.model_channels=64",
    "net.num_res_blocks=2",
    "+trainer.max_time=00:00:03:15",
    "callbacks.model_checkpoint.every_n_train_steps=250",
    "callbacks.model_checkpoint.every_n_epochs=null",
    "callbacks.sample_grid=null",
    "model.optimizer.lr=5e-4",
    "model.lr_scheduler.warmup_steps=200",
    "callbacks.ema.decay=0.995",  # 0.999 keeps ~30% of the initial weights after 1200 steps
    "callbacks.ema.warmup=false",  # as the recorded runs (before the EMA had a warm-up)
    "data.num_workers=4",
    "data.pin_memory=true",
    "data.persistent_workers=true",
    "logger=csv",
]
# The same pipeline in miniature on a CPU (`PRESET=smoke bash experiments/gpu_short.sh`): checks it end to end.
SMOKE = [
    "experiment=quickstart",
    "data.image_size=16",
    "data.limit_train_size=512",
    "net.model_channels=16",
    "+trainer.max_time=00:00:00:20",
    "trainer.val_check_interval=null",
    "trainer.check_val_every_n_epoch=1",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.model_checkpoint.every_n_epochs=null",
    "logger=csv",
]
PRESETS = {"none": [], "gpu_short": GPU_SHORT, "smoke": SMOKE}


def ensure_checkpoint(run_dir: Path, overrides: list[str], resume_unfinished: bool = False) -> Path:
    """Train with src/train.py into ``run_dir`` unless its last.ckpt exists; return the checkpoint path. With
    ``resume_unfinished``, a run without its run_summary.json (stopped half-way: its last.ckpt is an earlier step's)
    is resumed from that checkpoint (bit-exact: the same run as one uninterrupted)."""
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    unfinished = resume_unfinished and ckpt.is_file() and not (run_dir / "run_summary.json").is_file()
    if not ckpt.is_file() or unfinished:
        resume = [f"ckpt_path={ckpt}"] if unfinished else []
        cmd = [sys.executable, str(ROOT / "src" / "train.py"), *overrides, *resume, f"hydra.run.dir={run_dir}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return ckpt


def record_test_set(record: dict[str, Any]) -> Any:
    """The test dataset of a run record's own data config."""
    register_resolvers()
    datamodule = instantiate(record["config"]["data"])
    datamodule.setup("test")
    return datamodule.test


def load(ckpt: Path, device: torch.device) -> tuple[Any, dict[str, Any], Any]:
    """(module, run record, test dataset of the checkpoint's own data)."""
    register_resolvers()
    module, record = load_module(ckpt, map_location=device)
    return module, record, record_test_set(record)


def real_metrics(
    dataset: Any,
    num_real: int,
    metrics: tuple[str, ...],
    feature_net: str,
    device: torch.device,
    cache_key: dict[str, Any],
) -> GenerativeMetrics:
    """GenerativeMetrics with the real statistics of ``num_real`` test images filled (cached under logs/)."""
    gm = GenerativeMetrics(metrics, feature_net, kid_subset_size=min(100, num_real)).to(device)
    batches = (x.to(device) for x, _ in DataLoader(dataset, batch_size=500))
    gm.fill_real(batches, num_real, cache_key, ROOT / "logs" / "fid_stats")
    return gm


def sampling_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for sampling on CUDA (the network only; sampler arithmetic stays fp32), nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def write_json(path: Path, payload: dict[str, Any] | list[Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str))


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats with 3 decimals."""

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)

"""What ``experiments/bench/run.py`` prints: one JSON-ready record per measurement and the run's summary line."""

from __future__ import annotations

import argparse
import platform
from typing import Any

import torch


def record(args: argparse.Namespace, device: torch.device, bench: str, params: int, **fields: Any) -> dict:
    """One measurement as a JSON-ready dict (printed by ``main``)."""
    out = {
        "bench": bench,
        "net": args.net,
        "params": params,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "precision": args.precision,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "fused_optimizer": args.fused_optimizer,
        "image_size": args.image_size,
        "channels": args.channels,
        **fields,
    }
    if device.type == "cuda":
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    out["torch"] = torch.__version__
    return out


def cpu_name() -> str:
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def summary(records: list[dict], args: argparse.Namespace, peak: float | None) -> dict:
    by = {r["bench"]: r for r in records}
    bare = by["train_bare"]["images_per_s"]
    out = {
        "bench": "summary",
        "net": records[0]["net"],
        "device": records[0]["device"],
        "precision": records[0]["precision"],
        "compile": args.compile,
        "channels_last": args.channels_last,
        "fused_optimizer": args.fused_optimizer,
        "matmul_tflop_per_s": None if peak is None else round(peak / 1e12, 1),
        "train_bare_images_per_s": bare,
        "sample_image_steps_per_s": by["sample"]["image_steps_per_s"],
    }
    if "ema_update" in by:  # the EMA update's share of a bare training step, with each callback
        step_ms = 1000.0 * args.batch_size / bare
        for name in ("lightning", "difflab"):
            out[f"ema_{name}_pct_of_step"] = round(100.0 * by["ema_update"][f"{name}_ms"] / step_ms, 2)
    if "train_lightning" in by:
        light = by["train_lightning"]["images_per_s"]
        out["train_lightning_images_per_s"] = light
        # extra time per training step under Lightning, relative to the bare loop
        out["lightning_gap_pct"] = round((bare / light - 1.0) * 100.0, 2)
    if "accuracy" in by:  # the fast path against fp32 eager (accuracy.py)
        for key in ("outputs_agree", "output_rel_err", "loss_curves_agree", "loss_final_rel_diff"):
            out[key] = by["accuracy"][key]
    if args.peer != "none":
        out["peer_levers"] = args.peer_levers
        out[f"train_speedup_vs_{args.peer}"] = round(bare / by[f"train_bare_{args.peer}"]["images_per_s"], 3)
        sample_peer = by[f"sample_{args.peer}"]["image_steps_per_s"]
        out[f"sample_speedup_vs_{args.peer}"] = round(by["sample"]["image_steps_per_s"] / sample_peer, 3)
    return out

"""``python src/train.py ... plan=true``: the memory each process will need, before anything is launched.

The network is built on PyTorch's meta device (shapes, no storage), so DiT-XL/2 plans in seconds on a laptop.
Per process:

- weights: trainable parameters (fp32 master copies) — whole under DDP / one device, 1/world_size under FSDP — plus
  frozen ones (latent diffusion's autoencoder), whole everywhere;
- gradients (fp32, as the weights), Adam's two moments (2 × fp32), the EMA (fp32, if ``callbacks.ema``);
- DDP's gradient buckets (a second fp32 copy of the gradients, for the all-reduce);
- FSDP's gathered parameters: the largest unit in the compute dtype, twice (the one running and the one prefetched);
- activations: the bytes autograd saves for the backward pass in one training forward of the network on a batch of
  ``data.batch_size`` (counted with ``torch.autograd.graph.saved_tensors_hooks`` on meta tensors, so
  ``net.checkpointing=true`` shows its saving), halved for 16-bit compute.

Not counted: the CUDA context and allocator fragmentation (typically 1–3 GB), data loader buffers, communication
buffers, temporary tensors of single operators. Treat the total as a lower bound with that margin.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)

GIB = 1024**3


def _world_size(cfg: DictConfig) -> int:
    devices = cfg.trainer.get("devices", 1)
    if devices in (-1, "auto"):
        devices = max(torch.cuda.device_count(), 1)
        log.warning("plan: trainer.devices=-1 counts the GPUs of this machine (%d); set trainer.devices=N", devices)
    count = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
    return count * int(cfg.trainer.get("num_nodes", 1))


def _compute_bytes(cfg: DictConfig) -> int:
    """Bytes per element of the forward's activations: 2 under bf16/fp16 (autocast or FSDP's param_dtype), else 4."""
    strategy = cfg.trainer.get("strategy")
    param_dtype = strategy.get("param_dtype") if isinstance(strategy, DictConfig) else None
    autocast = str(cfg.trainer.get("precision", "32")).startswith(("16", "bf16"))
    return 2 if autocast or param_dtype in ("bfloat16", "float16") else 4


def activation_bytes(module: Any, batch_size: int, compute_bytes: int) -> int:
    """Bytes saved for the backward by one training forward of ``module``'s network on meta tensors."""
    saved = 0
    weights = {p.untyped_storage()._cdata for p in module.parameters()}  # saved weights are no new memory

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if tensor.untyped_storage()._cdata in weights:
            return tensor
        size = tensor.element_size() if not tensor.is_floating_point() else min(tensor.element_size(), compute_bytes)
        saved += tensor.numel() * size
        return tensor

    x_t = torch.randn(batch_size, *module.image_shape, device="meta")
    t = torch.zeros(batch_size, dtype=torch.long, device="meta")
    y = torch.zeros(batch_size, dtype=torch.long) if getattr(module, "num_classes", None) else None
    if y is not None and hasattr(module, "condition"):  # latent diffusion: labels → its conditioner's condition
        y = module.condition(y)
    y = y.to("meta") if y is not None else None
    module.train()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module.denoise(x_t, t, y)
    return saved


def _on_meta(factory: Any) -> Any:
    """The network factory ``factory`` (a partial) building on the meta device (the rest of the model is small)."""

    def build(*args: Any, **kwargs: Any) -> Any:
        with torch.device("meta"):
            return factory(*args, **kwargs)

    return build


def memory_plan(cfg: DictConfig) -> dict[str, Any]:
    """The per-process memory table of the configured run (bytes), and the settings it assumed."""
    module = instantiate(cfg.model, net=_on_meta(instantiate(cfg.model.net)))
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    sharded = target.endswith("FSDPStrategy")
    world = _world_size(cfg)
    share = world if sharded else 1
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    ema = bool((cfg.get("callbacks") or {}).get("ema"))
    compute = _compute_bytes(cfg)
    rows = {
        "weights": 4 * trainable / share + 4 * frozen,
        "gradients": 4 * trainable / share,
        "optimizer (Adam m, v)": 8 * trainable / share,
        "EMA": 4 * trainable / share if ema else 0,
    }
    if world > 1 and not sharded:  # DDP's gradient buckets (Lightning: gradient_as_bucket_view=false)
        rows["DDP gradient buckets"] = 4 * trainable
    if sharded:
        units = list(getattr(module.net, "shard_units", list)())
        largest = max((sum(p.numel() for p in u.parameters()) for u in units), default=trainable)
        rows["FSDP gathered units (2 × largest)"] = 2 * compute * largest
    try:
        rows["activations"] = activation_bytes(module, int(cfg.data.batch_size), compute)
    except Exception as err:  # an operator without a meta kernel: say so rather than guess
        log.warning("plan: activations not estimated (%s: %s)", type(err).__name__, err)
        rows["activations"] = float("nan")
    return {
        "strategy": "FSDP" if sharded else ("DDP" if world > 1 else "one device"),
        "processes": world,
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "batch_per_process": int(cfg.data.batch_size),
        "checkpointing": bool(cfg.net.get("checkpointing", False)) if "net" in cfg else False,
        "bytes": rows,
        "total": sum(rows.values()),
    }


def format_plan(plan: dict[str, Any], device_gib: float | None) -> str:
    """The plan as a short table; with ``device_gib``, whether it fits."""
    lines = [
        f"Memory plan: {plan['strategy']} over {plan['processes']} process(es), batch {plan['batch_per_process']} per "
        f"process, activation checkpointing {'on' if plan['checkpointing'] else 'off'}",
        f"  parameters: {plan['trainable_parameters']:,} trainable, {plan['frozen_parameters']:,} frozen",
    ]
    lines += [f"  {name:<36} {value / GIB:9.2f} GiB" for name, value in plan["bytes"].items()]
    lines.append(f"  {'total per process (lower bound)':<36} {plan['total'] / GIB:9.2f} GiB")
    if device_gib:
        verdict = "fits" if plan["total"] / GIB < 0.9 * device_gib else "does NOT fit"
        margin = "keeping 10 % for the CUDA context and fragmentation"
        lines.append(f"  {verdict} in {device_gib:g} GiB per device ({margin})")
    return "\n".join(lines)


def plan(cfg: DictConfig) -> dict[str, Any]:
    """Print and return the memory plan (``train.py plan=true``); nothing is trained or written."""
    result = memory_plan(cfg)
    print(format_plan(result, cfg.get("plan_device_gib")))
    return {"metrics": {}, "plan": result}

"""The EMA update of one training step, Lightning's ``EMAWeightAveraging`` vs ``difflab.callbacks.EMA``, on the
benchmark's network (used by ``run.py``; run alone: ``python experiments/bench/ema.py --net unet_m``).

Both callbacks keep the same average (tests/unit/test_ema.py); this times one update of each after
``--warmup-steps`` untimed ones and counts the operators an update dispatches (on a GPU each is at least one kernel
launch) and the host-device synchronisations it makes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from difflab.callbacks import EMA

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from experiments.bench.options import build_net, parse_args, resolve_device  # noqa: E402
from experiments.bench.peer import clocked  # noqa: E402
from experiments.bench.report import record  # noqa: E402


class _Ops(TorchDispatchMode):
    """Count dispatched operators, and the ones that read a device value back to the host."""

    SYNCING = {"aten._local_scalar_dense.default"}  # .item(), bool(), int() of a tensor

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += str(func) in self.SYNCING
        return func(*args, **(kwargs or {}))


class _Holder(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def bench_ema(args: argparse.Namespace, device: torch.device, net: nn.Module, record: Callable[..., dict]) -> dict:
    """ms per EMA update of each callback on ``net`` (fp32 weights on ``device``), operators and syncs per update."""
    module = _Holder(net.to(device))
    fields = {}
    for name, callback in (
        ("lightning", EMAWeightAveraging(decay=0.9999, use_buffers=False)),
        ("difflab", EMA(decay=0.9999)),
    ):
        callback.setup(None, module, "fit")
        update = getattr(callback, "update", None) or callback._average_model.update_parameters
        for _ in range(max(args.warmup_steps, 1)):  # the first update copies
            update(module)
        with _Ops() as ops:
            update(module)

        def updates(update: Callable = update) -> None:  # this callback's update
            for _ in range(args.train_steps):
                update(module)

        seconds = clocked(device, updates)
        fields[f"{name}_ms"] = round(seconds / args.train_steps * 1000, 3)
        fields[f"{name}_ops"], fields[f"{name}_syncs"] = ops.ops, ops.syncs
    fields["speedup"] = round(fields["lightning_ms"] / fields["difflab_ms"], 2)
    params = sum(p.numel() for p in net.parameters())
    return record(args, device, "ema_update", params, tensors=len(list(net.parameters())), **fields)


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    device = resolve_device(args.device)
    print(json.dumps(bench_ema(args, device, build_net(args), record)))

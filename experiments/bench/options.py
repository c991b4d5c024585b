"""The benchmark's command line and the network it builds: shared by ``run.py`` and ``ema.py`` (run alone), so
neither imports the other."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from difflab.utils.speed import CompileMode
from experiments.bench.peer import diffusers_peer

DESCRIPTION = "Throughput benchmark of a network preset (UNet or DiT): training (bare loop and Lightning) and sampling."
CONF_NET = Path(__file__).resolve().parents[2] / "conf" / "net"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--net", default="unet_s", help="preset in conf/net/ (unet_s | unet_m | dit_s2 | ...)")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: bfloat16 autocast")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps (after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before each measurement")
    p.add_argument("--sample-batch-size", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=10, help="timed sampler steps (network forwards)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer", choices=["none", "diffusers"], default="none", help="also time the peer network")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="none",
        choices=[m.value for m in CompileMode],
        help="torch.compile the networks (bare flag: mode default; reduce-overhead adds CUDA graphs)",
    )
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    p.add_argument("--fused-optimizer", action="store_true", help="AdamW(fused=True) (both sides, as model.optimizer)")
    p.add_argument("--skip-lightning", action="store_true", help="only the bare loops")
    p.add_argument("--data-on-device", action="store_true", help="Trainer.fit run: data.on_device batches")
    p.add_argument(
        "--peer-levers",
        choices=["anchor", "same"],
        default="anchor",
        help="anchor: the peer as the issue's anchor ran it (eager, NCHW, foreach AdamW, the run's precision); "
        "same: the run's --compile/--channels-last/--fused-optimizer on the peer too",
    )
    p.add_argument(
        "--accuracy-steps", type=int, default=10, help="steps of the plain-vs-fast loss curves (0: no accuracy check)"
    )
    return p.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    return torch.device(name)


def net_factory(name: str) -> Any:
    """The ``_partial_`` network factory of conf/net/<name>.yaml."""
    path = CONF_NET / f"{name}.yaml"
    if not path.is_file():
        presets = sorted(p.stem for p in CONF_NET.glob("*.yaml"))
        raise SystemExit(f"--net {name}: no {path}; presets: {presets}")
    return instantiate(OmegaConf.load(path))


def build_net(args: argparse.Namespace, which: str = "difflab") -> nn.Module:
    """difflab's network of preset ``--net``, or (``which="diffusers"``) the peer of the same shape."""
    if which == "diffusers":
        cfg = OmegaConf.to_container(OmegaConf.load(CONF_NET / f"{args.net}.yaml"))
        return diffusers_peer(cfg, args.channels, args.image_size)
    factory = net_factory(args.net)
    return factory(in_channels=args.channels, out_channels=args.channels, image_size=args.image_size, num_classes=None)


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())

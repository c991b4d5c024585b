"""Throughput benchmark of a network preset (UNet or DiT): training (bare loop and Lightning) and sampling.

Usage (``make bench`` runs the first line)::

    python experiments/bench/run.py --net unet_s --device cpu
    python experiments/bench/run.py --net unet_m --device cuda --precision bf16 --batch-size 128 --train-steps 50
    python experiments/bench/run.py --net dit_s2 --device cuda --precision bf16 --channels 4 --peer diffusers

Measurements, each printed to stdout as one JSON line:

* ``train_bare``: a plain PyTorch loop (q_sample of :class:`GaussianDiffusion`, MSE on ε, AdamW step) on a
  device-resident batch; images/s after ``--warmup-steps`` untimed steps.
* ``train_lightning``: ``Trainer.fit`` of :class:`DiffusionModule` on the same net config (AdamW, no LR schedule)
  over an in-memory synthetic dataset; timed by a callback from the start of step ``warmup`` to the end of the
  last step. The summary line gives the Lightning overhead over the bare loop in % of time per step.
* ``sample``: ``--sample-steps`` network forwards under ``torch.inference_mode`` plus one
  :meth:`AncestralSampler.step` each; image-steps/s (one forward at batch B = B image-steps).
* ``ema_update``: the EMA update after a training step, Lightning's ``EMAWeightAveraging`` vs
  ``difflab.callbacks.EMA`` (``ema.py``): ms, operators and host syncs per update.

On CUDA the clock is read only at the timing boundaries, after ``torch.cuda.synchronize()``. Lightning's own
messages go to stderr, so stdout holds only the JSON lines. This is a benchmark, not a test.

``--peer diffusers`` times diffusers' ``UNet2DModel`` (``DiTTransformer2DModel`` for ``--net dit_*``) of the same
shape (see ``peer.py``) with the same bare training loop and sampling loop, in the same process, and prints
the ratios. ``--compile`` (``torch.compile``),
``--channels-last`` and ``--fused-optimizer`` apply to both sides. MFU = achieved FLOP/s (FlopCounterMode's count
of a step) over the dense matmul rate measured in the same run, in the run's precision.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from difflab.data.device_batches import DeviceBatches
from difflab.data.transforms import InMemoryImageDataset
from difflab.modules import DiffusionModule
from difflab.samplers import AncestralSampler
from difflab.schedules import GaussianDiffusion
from difflab.utils.speed import CompileMode, compile_in_place

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from experiments.bench.accuracy import bench_accuracy  # noqa: E402
from experiments.bench.ema import bench_ema  # noqa: E402
from experiments.bench.options import build_net, count_params, net_factory, parse_args, resolve_device  # noqa: E402
from experiments.bench.peer import (  # noqa: E402
    clocked,
    forward_flops_per_image,
    matmul_flops_per_s,
    sync,
    train_flops_per_image,
)
from experiments.bench.report import record, summary  # noqa: E402

LR = 2e-4


def prepare(net: nn.Module, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """Move to ``device`` with the requested memory format; compile last (the FLOP count uses the eager net)."""
    net = net.to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def maybe_compile(net: nn.Module, args: argparse.Namespace) -> nn.Module:
    return compile_in_place(net, CompileMode(args.compile))


def new_images(args: argparse.Namespace, batch: int, device: torch.device) -> torch.Tensor:
    x = torch.rand(batch, args.channels, args.image_size, args.image_size, device=device) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    return None if peak is None else round(flops_per_s / peak, 4)


def autocast(args: argparse.Namespace, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_train_bare(args: argparse.Namespace, device: torch.device, which: str, peak: float | None) -> dict:
    torch.manual_seed(args.seed)
    eager = prepare(build_net(args, which), args, device).train()
    diffusion = GaussianDiffusion().to(device)
    opt = torch.optim.AdamW(eager.parameters(), lr=LR, fused=args.fused_optimizer or None)
    x0 = new_images(args, args.batch_size, device)
    t0 = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    with autocast(args, device):
        flops = train_flops_per_image(eager, x0, t0)
    net = maybe_compile(eager, args)

    def step() -> None:
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        with autocast(args, device):
            loss = nn.functional.mse_loss(net(diffusion.q_sample(x0, t, noise), t).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def steps(n: int) -> None:
        for _ in range(n):
            step()

    reset_peak(device)
    seconds = clocked(device, functools.partial(steps, args.train_steps), functools.partial(steps, args.warmup_steps))
    images_per_s = args.batch_size * args.train_steps / seconds
    return record(
        args,
        device,
        "train_bare" if which == "difflab" else f"train_bare_{which}",
        count_params(eager),
        batch_size=args.batch_size,
        steps=args.train_steps,
        seconds=seconds,
        images_per_s=images_per_s,
        gflop_per_image=round(flops / 1e9, 3),
        mfu=mfu(images_per_s * flops, peak),
    )


class StepTimer(pl.Callback):
    """Clock at the start of batch ``warmup`` and at the end of the last batch (after a device sync)."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup, self.total = warmup, total
        self.start = self.end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.total - 1:
            sync(pl_module.device)
            self.end = time.perf_counter()


def bench_train_lightning(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    total = args.warmup_steps + args.train_steps
    module = DiffusionModule(
        net=net_factory(args.net),
        schedule=GaussianDiffusion(),
        optimizer=functools.partial(torch.optim.AdamW, lr=LR, fused=args.fused_optimizer or None),
        image_shape=(args.channels, args.image_size, args.image_size),
        compile=args.compile,  # the platform's own switches (model.compile,
        channels_last=args.channels_last,  # model.channels_last), as `src/train.py` runs them
    )
    shape = (total * args.batch_size, args.channels, args.image_size, args.image_size)
    labels = torch.zeros(shape[0], dtype=torch.long)
    if args.data_on_device:  # data.on_device=true: the set on the device, batches gathered there
        data = InMemoryImageDataset(torch.randint(0, 256, shape, dtype=torch.uint8), labels, args.channels)
        loader = DeviceBatches(data, args.batch_size, device, seed=args.seed, epoch=lambda: 0)
    else:
        loader = DataLoader(TensorDataset(torch.rand(shape) * 2 - 1, labels), batch_size=args.batch_size)
    timer = StepTimer(args.warmup_steps, total)
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=total,
        max_epochs=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    reset_peak(device)
    with warnings.catch_warnings():
        for message in (".*does not have many workers.*", ".*Skipping val loop.*", ".*LeafSpec.*"):
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, train_dataloaders=loader)
    seconds = timer.end - timer.start
    return record(
        args,
        device,
        "train_lightning",
        count_params(module.net),
        batch_size=args.batch_size,
        steps=args.train_steps,
        seconds=seconds,
        images_per_s=args.batch_size * args.train_steps / seconds,
    )


@torch.inference_mode()
def bench_sample(args: argparse.Namespace, device: torch.device, which: str, peak: float | None) -> dict:
    torch.manual_seed(args.seed)
    eager = prepare(build_net(args, which), args, device).eval()
    with autocast(args, device):
        t1 = torch.zeros(1, dtype=torch.long, device=device)
        flops = forward_flops_per_image(eager, new_images(args, 1, device), t1)
    net = maybe_compile(eager, args)
    diffusion = GaussianDiffusion().to(device)
    sampler = AncestralSampler(diffusion, steps=args.sample_steps)
    shape = (args.sample_batch_size, args.channels, args.image_size, args.image_size)

    def run(timesteps: list[int]) -> None:
        x = torch.randn(shape, device=device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for t in timesteps:
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            with autocast(args, device):
                out = net(x, t_batch)
            x = sampler.step(out.float(), t, x).prev_sample

    timesteps = sampler.timesteps.tolist()
    reset_peak(device)
    seconds = clocked(device, functools.partial(run, timesteps), functools.partial(run, timesteps[: args.warmup_steps]))
    image_steps_per_s = args.sample_batch_size * args.sample_steps / seconds
    return record(
        args,
        device,
        "sample" if which == "difflab" else f"sample_{which}",
        count_params(eager),
        batch_size=args.sample_batch_size,
        steps=args.sample_steps,
        seconds=seconds,
        image_steps_per_s=image_steps_per_s,
        gflop_per_image_step=round(flops / 1e9, 3),
        mfu=mfu(image_steps_per_s * flops, peak),
    )


def accuracy(args: argparse.Namespace, device: torch.device) -> dict:
    """The plain path vs the run's fast path (``accuracy.py``) on one freshly built network."""

    def optimise(net: nn.Module) -> nn.Module:
        return maybe_compile(prepare(net, args, device), args)

    return bench_accuracy(args, device, build_net(args), optimise, lambda: autocast(args, device), record)


def peer_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags the peer runs with: the issue's anchor (no levers) or, ``--peer-levers same``, the run's."""
    if args.peer_levers == "same":
        return args
    return argparse.Namespace(**{**vars(args), "compile": "none", "channels_last": False, "fused_optimizer": False})


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the three measurements and print one JSON line each, then the summary; returns all the lines.
    ``--quality`` runs the quality benchmark instead (``quality.py``: FID per training compute against the peer)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--quality" in argv:
        from experiments.bench.quality import main as quality

        quality(argv)
        return []
    args = parse_args(argv)
    if args.train_steps < 1 or args.sample_steps < 1 or args.warmup_steps < 0:
        raise SystemExit("--train-steps and --sample-steps must be >= 1, --warmup-steps >= 0")
    device = resolve_device(args.device)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_flops_per_s(device, dtype)
    runs = [functools.partial(bench_train_bare, which="difflab", peak=peak)]
    if not args.skip_lightning:
        runs.append(bench_train_lightning)
    runs.append(functools.partial(bench_sample, which="difflab", peak=peak))
    runs.append(lambda args, device: bench_ema(args, device, build_net(args), record))
    if args.accuracy_steps > 0:
        runs.append(accuracy)
    runs = [(bench, args) for bench in runs]  # each measurement with the flags it runs under
    if args.peer != "none":
        peer = peer_args(args)
        runs += [(functools.partial(f, which=args.peer, peak=peak), peer) for f in (bench_train_bare, bench_sample)]
    records = []
    for bench, run_args in runs:
        records.append(bench(run_args, device))
        print(json.dumps(records[-1]), flush=True)
    records.append(summary(records, args, peak))
    print(json.dumps(records[-1]), flush=True)
    return records


if __name__ == "__main__":
    main()

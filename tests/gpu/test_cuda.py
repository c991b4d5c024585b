"""The GPU-only paths, run where a CUDA device is (``pytest -m gpu``; skipped elsewhere, as in CI).

What CPU tests cannot show: that the training and sampler steps never synchronise with the host on a real device
(CUDA's sync debug mode raises on any synchronising call), that ``trainer=gpu``'s bf16-mixed run with every lever
on (fused Adam with clipping, channels_last, CUDA graphs, batches gathered on the device) trains and samples, and
the benchmark's accuracy verdict for bf16 on a GPU. ``DIFFLAB_GPU_TEST_DEVICE=cpu`` runs the same code on a CPU
(the sync check is then vacuous) to check the tests themselves.
"""

from __future__ import annotations

import functools
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch

from difflab.callbacks import EMA, NonFiniteGuard, TrainingRandomState
from difflab.data import DigitsDataModule
from difflab.data.device_batches import DeviceBatches
from tests.conftest import ONE_OF_EACH_SAMPLER, bare_trainer, load_bench, tiny_diffusion_module

DEVICE = os.environ.get("DIFFLAB_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class NoSync:
    """CUDA's sync debug mode set to raise inside the block (a no-op on a CPU)."""

    def __enter__(self) -> None:
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc) -> None:
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("default")


def fused_module(**kwargs):
    adam = functools.partial(torch.optim.Adam, lr=1e-3, fused=True)
    return tiny_diffusion_module(num_timesteps=20, optimizer=adam, **kwargs).to(DEVICE)


NETS = pytest.mark.parametrize("net", ["unet", "dit"])


@pytest.mark.parametrize("kwargs", [{}, {"num_classes": 3, "p_uncond": 0.1}], ids=["ddpm", "cfg"])
@NETS
def test_training_step_never_syncs(kwargs, net):
    """Forward, loss, backward, clipping, the fused Adam step and the EMA update, in bf16 autocast."""
    m = fused_module(net=net, **kwargs)
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    ema = EMA(decay=0.9)
    ema.setup(None, m, "fit")
    x = torch.rand(4, 1, 8, 8, device=DEVICE) * 2 - 1
    batch = (x, torch.tensor([0, 1, 2, 0], device=DEVICE))
    for _ in range(3):
        with NoSync():
            with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
                loss = m.training_step(batch, 0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(m)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("action", ["stop", "skip"])
def test_nonfinite_guard_and_training_random_stream_never_sync(action):
    """The per-step work of the callbacks every training run has: the swap of the training random stream around
    the step and the guard's gradient check (with a fused optimizer's sync-free skip), a NaN step included."""
    m = fused_module()
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    trainer = bare_trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1)
    guard, stream = NonFiniteGuard(action), TrainingRandomState(0)
    guard.on_train_start(trainer, m)
    stream.on_train_start(trainer, m)
    batch = (torch.rand(4, 1, 8, 8, device=DEVICE) * 2 - 1, torch.zeros(4, dtype=torch.long, device=DEVICE))
    for step in range(3):
        with NoSync():
            stream.on_train_batch_start(trainer, m)
            m.training_step(batch, 0).backward()
            if step == 1:
                next(m.parameters()).grad.fill_(float("nan"))
            guard.on_before_optimizer_step(trainer, m, opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stream.on_train_batch_end(trainer, m)
    # skip: the NaN step is dropped; stop (noticed at the next logging step): the NaN weights spoil the next step
    assert int(guard._first) == 1 and int(guard._count) == (1 if action == "skip" else 2)
    assert all(torch.isfinite(p).all() for p in m.parameters()) == (action == "skip")


@pytest.mark.parametrize("sampler", ONE_OF_EACH_SAMPLER)
@NETS
def test_sampler_steps_never_sync(sampler, net):
    m = fused_module(net=net).eval()
    built = m.build_sampler(sampler)
    built.set_timesteps()
    timesteps = built.timesteps.tolist()  # planned once per run, on the host
    x = torch.randn(2, 1, 8, 8, device=DEVICE)
    generator = torch.Generator(DEVICE).manual_seed(0)
    with torch.no_grad(), NoSync():
        for t in timesteps:
            t_batch = torch.full((x.shape[0],), t, dtype=built.timesteps.dtype, device=DEVICE)
            x = built.step(m(x, t_batch), t, x, generator=generator).prev_sample
    assert torch.isfinite(x).all()


class _LoaderKind(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.loader = trainer.train_dataloader


@NETS
def test_gpu_run_with_every_lever(net):
    """bf16-mixed, clipping with fused Adam, channels_last, compile with CUDA graphs, the EMA callback, the data set
    gathered on the device (data.on_device=auto): a short fit, then sampling through the compiled network."""
    m = fused_module(compile="reduce-overhead", channels_last=True, net=net)
    dm = DigitsDataModule(image_size=8, batch_size=16)
    kind = _LoaderKind()
    trainer = bare_trainer(
        accelerator="gpu" if DEVICE == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        max_steps=6,
        callbacks=[EMA(decay=0.9), kind],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|Skipping val loop).*")
        trainer.fit(m, datamodule=dm)
    assert trainer.global_step == 6
    assert isinstance(kind.loader, DeviceBatches) == (DEVICE == "cuda")
    m.eval()
    for n in (4, 4, 3):  # replays the captured graph, then a new batch size
        samples = m.sample(n, generator=torch.Generator(DEVICE).manual_seed(n), num_steps=5)
        assert samples.shape == (n, 1, 8, 8) and torch.isfinite(samples).all()


@pytest.mark.parametrize("net", ["unet_s", "dit_s4"])
def test_bench_accuracy_bf16(net):
    """The benchmark's own verdict on this device: bf16 + channels_last + fused Adam against strict fp32."""
    bench = load_bench()
    args = bench.parse_args(
        f"--net {net} --device {DEVICE} --precision bf16 --batch-size 16 --image-size 32 --channels 3 "
        "--channels-last --fused-optimizer --accuracy-steps 50".split()
    )
    acc = bench.accuracy(args, torch.device(DEVICE))
    assert acc["outputs_agree"] and acc["loss_curves_agree"], acc

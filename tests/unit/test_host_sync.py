"""No host-device synchronisation in a training step or a sampler step (the performance issue's "no .item() per
step"): on a GPU each of these calls stalls the launch queue. Checked on CPU by intercepting the tensor methods that
synchronise on CUDA."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode

from difflab.callbacks import TrainThroughput
from difflab.losses import DiffusionLoss, LossAwareTimestepSampler
from tests.conftest import ONE_OF_EACH_SAMPLER, bare_trainer, tiny_diffusion_module

SYNCING = {  # on CUDA each of these waits for the queued kernels
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "nonzero",
}


class HostSyncs(TorchFunctionMode):
    """Record every tensor call that would wait for the device (``self.calls``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCING:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


module = functools.partial(tiny_diffusion_module, num_timesteps=20)


def test_the_detector_sees_syncs():
    with HostSyncs() as syncs:
        torch.ones(2).sum().item(), bool(torch.ones(1) > 0), torch.ones(2).tolist()
    assert syncs.calls == ["item", "__bool__", "tolist"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_classes": 3, "p_uncond": 0.1},
        {
            "variance_type": "learned_range",
            "loss": DiffusionLoss(loss_type="hybrid"),
            "timestep_sampler": functools.partial(LossAwareTimestepSampler, history=1),
        },
    ],
    ids=["ddpm", "cfg", "iddpm_importance"],
)
@pytest.mark.parametrize("net", ["unet", "dit"])
def test_training_step_has_no_host_sync(kwargs, net):
    m = module(net=net, **kwargs)
    batch = (torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0]))
    for _ in range(3):
        with HostSyncs() as syncs:
            m.training_step(batch, 0).backward()
        assert syncs.calls == []


@pytest.mark.parametrize("sampler", ONE_OF_EACH_SAMPLER)
@pytest.mark.parametrize("net", ["unet", "dit"])
def test_sampler_steps_have_no_host_sync(sampler, net):
    m = module(net=net).eval()
    built = m.build_sampler(sampler)
    built.set_timesteps()  # once per run, as sample_loop does: plans the steps on the host
    timesteps = built.timesteps.tolist()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), HostSyncs() as syncs:
        for t in timesteps:  # sample_loop's body
            t_batch = torch.full((x.shape[0],), t, dtype=built.timesteps.dtype)
            x = built.step(m(x, t_batch), t, x).prev_sample
    assert syncs.calls == []


def fit_syncs(steps: int, nonfinite: str = "stop") -> list[str]:
    """The syncing calls of one epoch of ``steps`` training steps through ``Trainer.fit``, progress bar on, with the
    callbacks every training run has: the non-finite guard (``nonfinite``: its action) and the training random
    stream."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from difflab.callbacks import NonFiniteGuard, TrainingRandomState

    m = module(optimizer=functools.partial(torch.optim.Adam, fused=True))  # foreach Adam reads its CPU step counts
    m.log = pl.LightningModule.log.__get__(m)  # the real one (the test helper mutes it)
    # with the throughput clock every run has (it syncs the device only at the start, around validation, at the end)
    callbacks = [NonFiniteGuard(nonfinite), TrainingRandomState(0), TrainThroughput(warmup_steps=1)]
    trainer = bare_trainer(max_epochs=1, log_every_n_steps=1000, enable_progress_bar=True, callbacks=callbacks)
    data = TensorDataset(torch.rand(4 * steps, 1, 8, 8) * 2 - 1, torch.zeros(4 * steps, dtype=torch.long))
    with warnings.catch_warnings(), HostSyncs() as syncs:
        warnings.filterwarnings("ignore", ".*(does not have many workers|Skipping val loop).*")
        trainer.fit(m, DataLoader(data, batch_size=4))
    assert trainer.global_step == steps and "loss" in trainer.progress_bar_metrics
    return syncs.calls


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_fit_reads_the_loss_back_only_when_it_logs(nonfinite):
    """Lightning reads a ``prog_bar`` step metric back after every batch (with a progress bar or without), so the
    modules show the epoch's mean loss there and send the step loss to the logger only, which reads it back every
    ``log_every_n_steps``. With nothing to log in between, three times the steps make no more reads: those at the
    start and the end of the fit (the epoch's means, the model's move back to the CPU), none per step; the
    non-finite guard (either action, with a fused optimizer) and the training random stream add none per step."""
    short, long = fit_syncs(6, nonfinite), fit_syncs(18, nonfinite)
    assert long == short and short.count("item") < 6

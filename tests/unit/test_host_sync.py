"""No host-device synchronisation in a training step or a sampler step (the performance issue's "no .item() per
step"): on a GPU each of these calls stalls the launch queue. Checked on CPU by intercepting the tensor methods that
synchronise on CUDA."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.overrides import TorchFunctionMode

from difflab.losses import DiffusionLoss, LossAwareTimestepSampler
from difflab.samplers import AncestralSampler, DDIMSampler
from tests.conftest import tiny_diffusion_module

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
def test_training_step_has_no_host_sync(kwargs):
    m = module(**kwargs)
    batch = (torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0]))
    for _ in range(3):
        with HostSyncs() as syncs:
            m.training_step(batch, 0).backward()
        assert syncs.calls == []


@pytest.mark.parametrize("sampler", [AncestralSampler, functools.partial(DDIMSampler, steps=5, eta=0.5)])
def test_sampler_steps_have_no_host_sync(sampler):
    m = module().eval()
    built = m.build_sampler(sampler)
    built.set_timesteps()  # once per run, as sample_loop does: plans the steps on the host
    timesteps = built.timesteps.tolist()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), HostSyncs() as syncs:
        for t in timesteps:  # sample_loop's body
            t_batch = torch.full((x.shape[0],), t, dtype=torch.long)
            x = built.step(m(x, t_batch), t, x).prev_sample
    assert syncs.calls == []

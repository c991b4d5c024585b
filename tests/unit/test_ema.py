"""difflab.callbacks.EMA: the same averages and checkpoint layout as Lightning's EMAWeightAveraging, with one fused
operator per update, no host-device synchronisation, and the decay warm-up."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.utils._python_dispatch import TorchDispatchMode

from difflab.callbacks import EMA
from tests.conftest import perturb_weights, tiny_diffusion_module
from tests.unit.test_host_sync import HostSyncs


class OperatorCount(TorchDispatchMode):
    """Count the aten operators dispatched (on a GPU each is at least one kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def fitted(callback):
    """(module, callback) with the callback's averaged copy created as at the start of fit."""
    module = tiny_diffusion_module()
    callback.setup(SimpleNamespace(), module, "fit")
    return module, callback


def perturb(module, seed: int) -> None:
    """Stand-in for an optimizer step: move every parameter."""
    perturb_weights(module, seed, scale=0.1)


def averaged(callback) -> list[torch.Tensor]:
    return [p.detach().clone() for p in callback._average_model.module.parameters()]


def test_the_ema_copy_of_a_compiled_model_is_eager():
    """model.compile compiles in configure_model, which WeightAveraging.setup calls before copying the module: the
    copy must stay eager and the module compile afterwards, when Lightning calls configure_model itself."""
    module = tiny_diffusion_module(compile="default")
    ema = EMA(decay=0.9)
    ema.setup(SimpleNamespace(), module, "fit")
    assert getattr(ema._average_model.module.net, "_compiled_call_impl", None) is None
    assert getattr(module.net, "_compiled_call_impl", None) is None and "configure_model" not in vars(module)
    module.configure_model()  # Lightning's own call, after the callbacks' setup
    assert module.net._compiled_call_impl is not None
    assert getattr(ema._average_model.module.net, "_compiled_call_impl", None) is None


def test_same_average_as_lightnings_ema_weight_averaging():
    ours_module, ours = fitted(EMA(decay=0.9))
    theirs_module, theirs = fitted(EMAWeightAveraging(decay=0.9, use_buffers=False))
    for step in range(5):
        perturb(ours_module, step), perturb(theirs_module, step)
        ours.update(ours_module)
        theirs._average_model.update_parameters(theirs_module)
    for a, b in zip(averaged(ours), averaged(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert int(ours._average_model.n_averaged) == int(theirs._average_model.n_averaged) == 5


def test_closed_form_with_warmup():
    module, ema = fitted(EMA(decay=0.3, warmup=True))
    history = []
    for step in range(4):
        perturb(module, step)
        history.append([p.detach().clone() for p in module.parameters()])
        ema.update(module)
    # decay_n = min(0.3, (1 + n)/(10 + n)): 1/10, 2/11, 3/12, then capped (4/13 > 0.3); the first update copies
    assert [ema.decay_at(n) for n in range(4)] == [0.1, 2 / 11, 0.25, 0.3]
    expected = history[0]
    for n, weights in enumerate(history[1:], start=1):
        d = ema.decay_at(n)
        expected = [d * e + (1 - d) * w for e, w in zip(expected, weights, strict=True)]
    for a, b in zip(averaged(ema), expected, strict=True):
        torch.testing.assert_close(a, b)
    assert EMA(decay=0.3).decay_at(0) == 0.3  # no warm-up: the constant decay


def test_update_is_one_fused_operator_without_host_sync():
    module, ema = fitted(EMA(decay=0.9))
    ema.update(module)  # the first update copies
    with HostSyncs() as syncs, OperatorCount() as ops:
        ema.update(module)
    assert syncs.calls == []
    assert ops.count <= 2  # the lerp over all tensors and the counter increment
    # Lightning's update: per-tensor operators and two syncs on its device counter (why EMA exists)
    theirs_module, theirs = fitted(EMAWeightAveraging(decay=0.9, use_buffers=False))
    theirs._average_model.update_parameters(theirs_module)
    with HostSyncs() as syncs, OperatorCount() as ops:
        theirs._average_model.update_parameters(theirs_module)
    assert syncs.calls and ops.count > 3 * len(list(theirs_module.parameters()))


def test_update_every_n_steps():
    ema = EMA(update_every_n_steps=3)
    assert [ema.should_update(step_idx=i) for i in range(6)] == [True, False, False, True, False, False]
    assert not ema.should_update(epoch_idx=0)


def test_checkpoint_round_trip_restores_the_host_counter():
    module, ema = fitted(EMA(decay=0.9, warmup=True))
    for step in range(3):
        perturb(module, step)
        ema.update(module)
    checkpoint = {"state_dict": copy.deepcopy(module.state_dict())}
    ema.on_save_checkpoint(None, module, checkpoint)
    assert int(checkpoint["averaging_state"]["n_averaged"]) == 3 and "current_model_state" in checkpoint

    resumed_module, resumed = fitted(EMA(decay=0.9, warmup=True))
    resumed.on_load_checkpoint(None, resumed_module, checkpoint)
    assert resumed._num_updates == 3
    for a, b in zip(averaged(resumed), averaged(ema), strict=True):
        torch.testing.assert_close(a, b)
    # and the next update continues with decay_at(3), like the uninterrupted one
    perturb(module, 9), resumed_module.load_state_dict(module.state_dict())
    ema.update(module), resumed.update(resumed_module)
    for a, b in zip(averaged(resumed), averaged(ema), strict=True):
        torch.testing.assert_close(a, b)


def test_ema_copy_on_another_device_than_the_module(monkeypatch):
    """On a CPU-only machine the other device is ``meta`` (no values): the copy stays there, in the module's shapes,
    the module's own weights are not moved or changed, and the host counter advances; the values are checked on
    CUDA by the next test."""
    module, ema = fitted(EMA(decay=0.9, device="meta"))
    before = [p.detach().clone() for p in module.parameters()]
    calls = []
    for name in ("_foreach_lerp_", "_foreach_copy_"):  # spy: what each update writes into which tensors
        real = getattr(torch, name)
        monkeypatch.setattr(
            torch, name, lambda a, c, *w, name=name, real=real: calls.append((name, a, c, w)) or real(a, c, *w)
        )
    ema.update(module)  # the module's weights are moved to the EMA's device
    ema.update(module)
    # the first update copies every tensor, the second lerps every float one at 1 − decay; each into the EMA copy's
    # own tensors, from the module's weights moved to its device (a skipped transfer would leave these lists empty)
    targets = list(ema._average_model.module.state_dict(keep_vars=True).values())
    floats = [t for t in targets if t.is_floating_point()]
    assert [name for name, *_ in calls] == ["_foreach_copy_", "_foreach_lerp_"]
    for (_, written, read, _), expected in zip(calls, (targets, floats), strict=True):
        assert len(written) == len(expected) and all(a is b for a, b in zip(written, expected, strict=True))
        assert all(c.device.type == "meta" and c.shape == a.shape for a, c in zip(written, read, strict=True))
    assert calls[1][3] == (pytest.approx(0.1),)
    copies = averaged(ema)
    assert all(c.device.type == "meta" for c in copies) and ema._num_updates == 2
    assert [c.shape for c in copies] == [b.shape for b in before]
    for p, b in zip(module.parameters(), before, strict=True):
        assert p.device.type == "cpu" and torch.equal(p, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ema_copy_on_the_cpu_of_a_cuda_module():
    """``callbacks.ema.device=cpu`` for a model on the GPU: the CPU copy has the closed-form EMA values."""
    module, ema = fitted(EMA(decay=0.9, device="cpu"))
    module.cuda()
    history = []
    for step in range(3):
        perturb(module, step)
        history.append([p.detach().cpu().clone() for p in module.parameters()])
        ema.update(module)
    expected = [0.9 * (0.9 * a + 0.1 * b) + 0.1 * c for a, b, c in zip(*history, strict=True)]
    for a, e in zip(averaged(ema), expected, strict=True):
        assert a.device.type == "cpu"
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("kwargs", [{"decay": 1.0}, {"decay": -0.1}, {"update_every_n_steps": 0}])
def test_bad_arguments_are_refused(kwargs):
    with pytest.raises(ValueError, match="callbacks.ema"):
        EMA(**kwargs)

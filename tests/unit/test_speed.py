"""model.compile, model.channels_last and the fused optimizer: switchable, and numerically the plain path (CPU)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from difflab.modules import DiffusionModule
from difflab.utils.speed import CompileMode
from tests.conftest import bare_trainer, perturb_weights, tiny_diffusion_module

module = tiny_diffusion_module


def loss_and_grads(m: DiffusionModule, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    m.zero_grad()
    t = torch.tensor([0, 10, 25, 49])
    loss = m.diffusion_loss(x, None, t, torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))["loss"]
    loss.mean().backward()
    return loss.detach(), [p.grad.clone() for p in m.net.parameters()]


def assert_same_path(plain: DiffusionModule, fast: DiffusionModule) -> None:
    perturb_weights(plain)  # off the zero output layer: otherwise ε̂ = 0 and only its 2 tensors get gradients
    fast.load_state_dict(plain.state_dict())
    assert plain.state_dict().keys() == fast.state_dict().keys()  # checkpoints move freely between the two
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    loss_a, grads_a = loss_and_grads(plain, x)
    loss_b, grads_b = loss_and_grads(fast, x)
    assert all(g.abs().max() > 0 for g in grads_a)  # every parameter is compared through a non-zero gradient
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    plain.eval(), fast.eval()
    samples = [m.sample(2, generator=torch.Generator().manual_seed(2), num_steps=5) for m in (plain, fast)]
    torch.testing.assert_close(samples[1], samples[0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # and the network's output, which the samples depend on, is not the all-zero one
        assert plain(x, torch.tensor([0, 10, 25, 49])).abs().mean() > 0.01


NETS = pytest.mark.parametrize("net", ["unet", "dit"])


@NETS
def test_channels_last_is_the_plain_path(net):
    """For the DiT only the patch embedding is a convolution (one input channel here: both layouts coincide)."""
    fast = module(channels_last=True, net=net)
    if net == "unet":
        weight = next(p for p in fast.net.parameters() if p.dim() == 4 and p.shape[1] > 1)
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert_same_path(module(net=net), fast)


def test_compile_is_in_place_and_idempotent():
    fast = module(compile="reduce-overhead")
    assert fast.compile_mode is CompileMode.REDUCE_OVERHEAD
    keys, net = list(fast.state_dict()), fast.net
    fast.configure_model()
    compiled = fast.net._compiled_call_impl
    fast.configure_model()  # Lightning and load_module may both call it
    assert compiled is not None and fast.net._compiled_call_impl is compiled and fast.net is net
    assert list(fast.state_dict()) == keys  # checkpoints move freely between compiled and eager models
    eager = module()
    eager.configure_model()
    assert eager.net._compiled_call_impl is None  # compile=none


@pytest.mark.slow  # Inductor compiles forward, backward and a second batch size: ~3 minutes on 2 CPU cores
@NETS
def test_compile_is_the_plain_path(net):
    fast = module(compile="default", net=net)
    fast.configure_model()
    assert_same_path(module(net=net), fast)


def test_bad_speed_options_fail_at_construction():
    with pytest.raises(ValueError, match=r"model.compile='fast': expected one of \[none, default, reduce-overhead"):
        module(compile="fast")
    with pytest.raises(ValueError, match="model.channels_last='yes'"):
        module(channels_last="yes")


def fit_three_steps(precision: str, fused: bool, clip: float | None) -> DiffusionModule:
    # eps=1e-4: Adam divides by sqrt(v) + eps, so a larger eps keeps rounding of near-zero gradients small
    m = module(optimizer=functools.partial(torch.optim.Adam, lr=1e-2, eps=1e-4, fused=fused))
    data = TensorDataset(torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, torch.zeros(12))
    trainer = bare_trainer(max_steps=3, precision=precision, gradient_clip_val=clip)
    torch.manual_seed(0)  # the same t and noise draws in every run
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(m, DataLoader(data, batch_size=4))
    return m


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fused_adam_with_clipping_is_the_foreach_path(precision):
    """model.optimizer.fused=true: the same weights as the foreach Adam, gradient clipping included. Under
    bf16-mixed Lightning's plugin refuses to clip for fused optimizers; the module clips itself there."""
    plain, fused = (fit_three_steps(precision, f, clip=0.01) for f in (False, True))
    for a, b in zip(plain.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # rounding of fused vs foreach; a step is 1e-2
    unclipped = fit_three_steps(precision, True, clip=None)
    assert any(not torch.allclose(a, b) for a, b in zip(fused.parameters(), unclipped.parameters(), strict=True))


@NETS
def test_compile_never_recompiles_per_step(net, monkeypatch):
    """model.compile: Dynamo traces the network once for the training batch, once more when the epoch's last, smaller
    batch makes the batch dimension dynamic, and once for eval mode; never again, whatever the timesteps, the batch
    size or the number of sampling steps, and with no graph breaks (one graph per trace). Dynamo decides all of this
    before the backend, so a backend that only counts the graphs it is handed stands in for Inductor here."""
    graphs = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        graphs.append(gm)
        return gm.forward

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda net, **kw: compile_module(net, backend=counting_backend))
    torch._dynamo.reset()
    m = module(compile="default", net=net)
    m.configure_model()
    data = TensorDataset(torch.rand(26, 1, 8, 8) * 2 - 1, torch.zeros(26))  # 6 batches of 4, then one of 2
    trainer = bare_trainer(max_epochs=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(m, DataLoader(data, batch_size=4))
    assert trainer.global_step == 14 and len(graphs) == 2, [g.graph for g in graphs[2:]]
    m.eval()
    m.sample(4, num_steps=3)
    assert len(graphs) == 3  # eval mode
    for n, steps in ((4, 10), (3, 7), (2, 25)):
        m.sample(n, num_steps=steps)
    assert len(graphs) == 3
    torch._dynamo.reset()


@NETS
def test_sample_precision_autocasts_the_network_only(net):
    """model.sample_precision=bf16-mixed: the network runs under bf16 autocast in sample(), the sampler's arithmetic
    in fp32; the samples stay within bf16 rounding of the fp32 ones (same weights, same noise)."""
    plain, fast = module(net=net), module(sample_precision="bf16-mixed", net=net)
    perturb_weights(plain.net)  # weights away from the zero-initialised output layer, so that ε̂ is not 0
    fast.load_state_dict(plain.state_dict())
    dtypes = {}

    def record(name: str) -> Callable:
        return lambda module, args, out: dtypes.update({name: out.dtype})  # returns None: the output stays

    for name, m in (("plain", plain), ("fast", fast)):
        m.net.register_forward_hook(record(name))
    a, b = (m.sample(4, generator=torch.Generator().manual_seed(0), num_steps=10) for m in (plain, fast))
    assert dtypes == {"plain": torch.float32, "fast": torch.bfloat16} and b.dtype == torch.float32
    assert 0 < (b - a).abs().max() < 0.05 and a.abs().mean() > 0.1
    assert module().sample_dtype is None and module(sample_precision="16-mixed").sample_dtype is torch.float16

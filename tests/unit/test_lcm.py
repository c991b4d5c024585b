"""Latent consistency models (issue 31): LCM's c_skip/c_out and its boundary, the skipping-step grid and DDIM step,
the sampler's timesteps and errors, per-example CFG weights, and the optional w-embedding of the networks (off: the
networks and their state dicts unchanged; on: zero-initialised, outputs bit-identical until trained)."""

from __future__ import annotations

import functools

import pytest
import torch

from difflab.networks import DiT, UNet
from difflab.networks.embeddings import guidance_embedding
from difflab.samplers import LCMSampler
from difflab.samplers.guidance import classifier_free_guidance
from difflab.schedules import GaussianDiffusion, RectifiedFlow
from difflab.schedules.latent_consistency import LCMBoundary, ddim_step, lcm_timesteps, skipping_grid

NETS = {
    "unet": functools.partial(
        UNet, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_groups=8
    ),
    "dit": functools.partial(DiT, patch_size=2, hidden_size=32, depth=2, num_heads=2, frequency_size=32),
}


def test_boundary_condition_and_limits():
    boundary = LCMBoundary(timestep_scaling=10.0, sigma_data=0.5)
    assert boundary.scalings(0) == (1.0, 0.0)  # f(x, 0) = x exactly
    c_skip, c_out = boundary.scalings(torch.tensor([0.0, 1.0, 999.0], dtype=torch.float64))
    torch.testing.assert_close(
        c_skip, torch.tensor([1.0, 0.25 / 100.25, 0.25 / (9990.0**2 + 0.25)], dtype=torch.float64)
    )
    torch.testing.assert_close(
        c_out, torch.tensor([0.0, 10 / 100.25**0.5, 9990 / (9990.0**2 + 0.25) ** 0.5], dtype=torch.float64)
    )
    x, x0 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    f = boundary(x, x0, torch.tensor([0, 1, 999]))
    assert torch.equal(f[0], x[0])  # the boundary, bit for bit
    assert (f[2] - x0[2]).abs().max() < 1e-6  # far from 0: f is the network's x̂_0
    with pytest.raises(ValueError, match="timestep_scaling=0"):
        LCMBoundary(0.0)


def test_skipping_grid_and_sampling_timesteps():
    grid = skipping_grid(1000, 20)
    assert grid[:3].tolist() == [0, 19, 39] and grid[-1] == 999 and len(grid) == 51  # LCM's 50 DDIM points + t = 0
    assert lcm_timesteps(1000, 50, 4) == [999, 759, 499, 259]  # diffusers' LCMScheduler, 4 steps
    assert lcm_timesteps(1000, 50, 1) == [999]
    with pytest.raises(ValueError, match="model.skip=600"):
        skipping_grid(1000, 600)
    with pytest.raises(ValueError, match="sampler.steps=51"):
        lcm_timesteps(1000, 50, 51)


def test_ddim_step_is_the_ddim_update():
    """x_{t'} = sqrt(ᾱ_{t'}) x̂_0 + sqrt(1 − ᾱ_{t'}) ε̂ (DDIM eq. 12, η = 0), from the σ view's Euler step."""
    diffusion = GaussianDiffusion("scaled_linear", 1000, 0.00085, 0.012)
    ab, sig = diffusion.alphas_cumprod_64, diffusion.continuous.sigmas
    t, t_prev = torch.tensor([499, 999]), torch.tensor([479, 979])
    x_t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x0_hat = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    a = ab[t].sqrt().reshape(-1, 1, 1, 1)
    eps = (x_t - a * x0_hat) / (1 - a**2).sqrt()
    x_tilde = x_t / a  # the σ view
    step = ddim_step(lambda x, s, tt: x0_hat, x_tilde, (sig[t], t), (sig[t_prev], t_prev))
    a_prev = ab[t_prev].sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(step * a_prev, a_prev * x0_hat + (1 - a_prev**2).sqrt() * eps)


def test_sampler_settings_and_errors():
    diffusion = GaussianDiffusion("linear", 1000)
    sampler = LCMSampler(diffusion, "eps", steps=2)
    assert sampler.timesteps.tolist() == [999, 499] and sampler.original_steps == 50
    with pytest.raises(ValueError, match="sampler.steps=60"):
        LCMSampler(diffusion, "eps", steps=60)
    with pytest.raises(ValueError, match="sampler.original_steps=0"):
        LCMSampler(diffusion, "eps", original_steps=0)
    with pytest.raises(ValueError, match="flow"):
        LCMSampler(RectifiedFlow(), "v")
    assert LCMSampler(GaussianDiffusion("linear", 20), "eps", steps=2).timesteps.tolist() == [19, 9]  # min(50, T)


def test_per_example_guidance_weights():
    """classifier_free_guidance with w (B,) is, example by example, the float w's (1 + w) ε_c − w ε_∅."""
    torch.manual_seed(0)
    net = lambda x, t, y: x * (y[:, None, None, None].float() + 1) + t[:, None, None, None]  # noqa: E731
    x, t, y, w = (
        torch.randn(3, 2, 4, 4),
        torch.tensor([5, 6, 7]),
        torch.tensor([1, 2, 3]),
        torch.tensor([0.0, 1.5, 4.0]),
    )
    batched = classifier_free_guidance(net, y, 10, w)(x, t)
    for i in range(3):
        one = classifier_free_guidance(net, y[i : i + 1], 10, float(w[i]))(x[i : i + 1], t[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], one)


def test_guidance_features_are_lcms():
    """diffusers' ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` (its pipeline module needs
    transformers, so its arithmetic is written out here, in float64): 1000 w times exp(−k ln 10⁴/(half − 1)), sin
    then cos. Ours is float32: arguments up to 1000 w carry ~ulp(1000 w) of rounding, the tolerance."""
    w, half = torch.tensor([0.0, 1.0, 7.5], dtype=torch.float64), 128
    freqs = torch.exp(torch.arange(half, dtype=torch.float64) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    args = (w * 1000.0)[:, None] * freqs[None]
    expected = torch.cat([args.sin(), args.cos()], dim=1).float()
    torch.testing.assert_close(guidance_embedding(w.float(), 2 * half), expected, rtol=0, atol=8 * 2.0**-24 * 7500)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_default_networks_are_unchanged(kind):
    """guidance_embed defaults off: no parameters, the same state dict keys, a strict load, no w accepted."""
    torch.manual_seed(0)
    net = NETS[kind](in_channels=3, out_channels=3, image_size=8, num_classes=10)
    torch.manual_seed(0)
    explicit = NETS[kind](in_channels=3, out_channels=3, image_size=8, num_classes=10, guidance_embed=False)
    assert not any("guidance" in k for k in net.state_dict())
    explicit.load_state_dict(net.state_dict(), strict=True)
    for a, b in zip(net.state_dict().values(), explicit.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same initialisation draws
    with pytest.raises(ValueError, match="without a guidance embedding"):
        net(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), w=torch.ones(2))


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_zero_initialised_w_input_leaves_outputs_bit_identical(kind):
    torch.manual_seed(0)
    teacher = NETS[kind](in_channels=3, out_channels=3, image_size=8, num_classes=10)
    for p in teacher.parameters():  # zero-initialised output layers (UNet, adaLN-Zero) would hide a difference
        torch.nn.init.normal_(p, std=0.1)
    student = NETS[kind](in_channels=3, out_channels=3, image_size=8, num_classes=10, guidance_embed=True)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert len(missing) == 1 and "guidance_embed.proj.weight" in missing[0] and not unexpected
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 500, 999]), torch.tensor([1, 2, 3, 10])
    reference = teacher(x, t, y)
    assert reference.abs().max() > 0.1
    for w in (None, torch.tensor([0.0, 1.0, 3.0, 14.0])):
        assert torch.equal(student(x, t, y, w=w), reference)
    student(x, t, y, w=torch.full((4,), 2.0)).square().mean().backward()  # the w input learns
    proj = student.embed.guidance_embed.proj if kind == "dit" else student.guidance_embed.proj
    assert proj.weight.grad.abs().max() > 0

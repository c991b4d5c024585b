"""Consistency-model math (schedules/consistency.py, losses/consistency.py) and the module's target network."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from difflab import samplers
from difflab.losses.consistency import ConsistencyDistance, default_huber_c, pseudo_huber
from difflab.samplers import sample_loop
from difflab.schedules import GaussianDiffusion, Parameterization, SigmaProcess
from difflab.schedules.consistency import (
    ConsistencyFunction,
    curriculum_scales,
    denoised,
    heun_step,
    lognormal_index_probabilities,
)

F64 = torch.float64


def test_boundary_condition_and_scalings():
    f = ConsistencyFunction(0.002, 80.0, 0.5)
    x, d = torch.randn(3, 1, 4, 4, dtype=F64), torch.randn(3, 1, 4, 4, dtype=F64)
    torch.testing.assert_close(f(x, d, 0.002), x, rtol=0, atol=0)  # f(x, σ_min) = x whatever D is
    c_skip, c_out = f.scalings(torch.tensor([0.002, 1.0, 80.0], dtype=F64))
    assert c_skip[0] == 1 and c_out[0] == 0
    sigma = torch.tensor([0.3, 1.0, 7.0, 80.0], dtype=F64)
    c_skip, c_out = f.scalings(sigma)
    sd2 = 0.25
    edm_skip, edm_out = sd2 / (sigma**2 + sd2), sigma * 0.5 / (sigma**2 + sd2).sqrt()
    for i, s in enumerate(sigma.tolist()):  # f = c_skip x + c_out F with F the EDM output of D
        raw = (d - edm_skip[i] * x) / edm_out[i]
        torch.testing.assert_close(f(x, d, s), c_skip[i] * x + c_out[i] * raw, rtol=1e-12, atol=1e-12)
    assert torch.allclose(f(x, d, 80.0), d, atol=1e-4 * d.abs().max().item() + 1e-4)  # f ≈ D far from σ_min


def test_grid_and_sampling_points():
    f = ConsistencyFunction(0.002, 80.0)
    grid = f.grid(18)
    assert grid[0].item() == pytest.approx(0.002) and grid[-1].item() == pytest.approx(80.0)
    assert bool((grid[1:] > grid[:-1]).all())
    assert f.sampling_sigmas(1).tolist() == pytest.approx([80.0])
    assert f.sampling_sigmas(2).tolist() == pytest.approx([80.0, ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7])


def test_curriculum_values():
    # K = 800, s0 = 10, s1 = 1280: K' = ⌊800/(log2 128 + 1)⌋ = 100
    values = {k: curriculum_scales(k, 800) for k in (0, 99, 100, 250, 699, 700, 799, 5000)}
    assert values == {0: 11, 99: 11, 100: 21, 250: 41, 699: 641, 700: 1281, 799: 1281, 5000: 1281}
    assert curriculum_scales(0, 10, s0=2, s1=8) == 3 and curriculum_scales(9, 10, s0=2, s1=8) == 9


@pytest.mark.parametrize("n", [11, 21, 1281])
def test_lognormal_probabilities(n):
    sigmas = ConsistencyFunction(0.002, 80.0).grid(n)
    p = lognormal_index_probabilities(sigmas, -1.1, 2.0)
    assert p.shape == (n - 1,) and bool((p >= 0).all())
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12)
    if n == 1281:  # a fine grid: E[ln σ] ≈ P_mean (the truncation at ln 0.002 and ln 80 is nearly symmetric)
        mid = (sigmas[1:].log() + sigmas[:-1].log()) / 2
        assert float((p * mid).sum()) == pytest.approx(-1.1, abs=0.1)


def test_pseudo_huber():
    x = torch.zeros(2, 1, 4, 4)
    assert pseudo_huber(x, x, 0.03).abs().max() == 0
    small, big = torch.full_like(x, 1e-4), torch.full_like(x, 10.0)
    norm2 = 16 * 1e-8
    assert pseudo_huber(small, x, 0.03)[0].item() == pytest.approx(norm2 / (2 * 0.03), rel=1e-3)  # ≈ ||d||²/2c
    assert pseudo_huber(big, x, 0.03)[0].item() == pytest.approx(40.0 - 0.03, rel=1e-4)  # ≈ ||d|| − c
    assert default_huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072))
    assert ConsistencyDistance("pseudo_huber", 16).huber_c == pytest.approx(0.00054 * 4)


def test_lpips_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no backbone weights there
    with pytest.raises(ValueError, match="model.metric=lpips.*not available offline"):
        ConsistencyDistance("lpips", 64)


def eps_model(x_t, t, diffusion):
    """An analytic ε-network: the exact ε̂ for data N(0.2, 0.3²) per pixel on ``diffusion`` at (fractional) t."""
    sigma = diffusion.continuous.t_to_sigma(t.detach().cpu().double()).to(x_t.dtype).reshape(-1, 1, 1, 1)
    x = x_t * (1 + sigma**2).sqrt()
    d = 0.2 + 0.09 / (0.09 + sigma**2) * (x - 0.2)
    return (x - d) / sigma


def test_heun_teacher_step_equals_the_heun_sampler():
    diffusion = GaussianDiffusion(num_timesteps=1000, beta_schedule="cosine")
    sampler = samplers.HeunSampler(diffusion, steps=5, sigma_schedule="karras", sigma_max=80.0, clip_denoised=False)
    model = functools.partial(eps_model, diffusion=diffusion)
    x_t = torch.randn(2, 1, 4, 4, dtype=F64)
    sampler.set_timesteps(5)
    t0, t1 = sampler.timesteps[0], sampler.timesteps[1]  # the predictor at level 0, the corrector at level 1
    x = sampler.step(model(x_t, torch.full((2,), float(t0))), t0, x_t).prev_sample
    x = sampler.step(model(x, torch.full((2,), float(t1))), t1, x).prev_sample  # x_t at level 1
    s0, s1 = float(sampler.sigmas[0]), float(sampler.sigmas[1])
    solver = lambda x_in, s, t: denoised(diffusion, Parameterization.EPS, model, x_in, s, t)  # noqa: E731
    full = lambda v: torch.full((2,), v, dtype=F64)  # noqa: E731
    ours = heun_step(solver, x_t * math.sqrt(1 + s0**2), (full(s0), full(float(t0))), (full(s1), full(float(t1))))
    torch.testing.assert_close(ours / math.sqrt(1 + s1**2), x.double(), rtol=1e-5, atol=1e-5)


def test_sampler_sees_a_discrete_model_in_the_sigma_view():
    """One consistency step of an ε-model on a cosine DDPM equals the σ process's step on the same x̃ and D."""
    diffusion = GaussianDiffusion(num_timesteps=1000, beta_schedule="cosine")
    process = SigmaProcess("edm", sigma_min=diffusion.continuous.sigma_min, sigma_max=80.0)
    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    discrete = samplers.ConsistencySampler(diffusion, "eps", steps=2, clip_denoised=False)
    on_sigma = samplers.ConsistencySampler(process, "x0", steps=2, clip_denoised=False)
    assert on_sigma.sigmas.tolist() == pytest.approx(discrete.sigmas.tolist())
    model = functools.partial(eps_model, diffusion=diffusion)

    def d_model(x, sigma):  # the same data's D on the σ process
        return 0.2 + 0.09 / (0.09 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - 0.2)

    a = sample_loop(model, discrete, z.shape, torch.Generator().manual_seed(1), noise=z * discrete.init_noise_sigma)
    b = sample_loop(d_model, on_sigma, z.shape, torch.Generator().manual_seed(1), noise=z * on_sigma.init_noise_sigma)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # the discrete t(σ) interpolation of log σ
    assert discrete.nfe == 2


def test_target_network_update():
    from difflab.modules import ConsistencyModule
    from tests.conftest import TINY_NETS, perturb_weights

    torch.manual_seed(0)
    module = ConsistencyModule(
        net=TINY_NETS["unet"],
        schedule=SigmaProcess("edm"),
        optimizer=torch.optim.Adam,
        image_shape=(1, 8, 8),
        sampler=functools.partial(samplers.ConsistencySampler, steps=2),
        parameterization="x0",
        mode="training",
        target_decay=0.9,
    )
    assert module.target_net is None  # made for fit only (sampling never needs it)
    module.setup("fit")
    target = module.target_net
    start = [p.detach().clone() for p in target.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(start, module.net.parameters(), strict=True))  # θ⁻ = θ at first
    perturb_weights(module.net, seed=1)
    module.update_target()
    for before, now, theta in zip(start, target.parameters(), module.net.parameters(), strict=True):
        torch.testing.assert_close(now, 0.9 * before + 0.1 * theta.detach(), rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in target.parameters())
    assert not any(k.startswith("target") for k in module.state_dict())  # θ⁻ lives in checkpoint["consistency"]
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert set(checkpoint["consistency"]["target"]) == set(target.state_dict())
    assert checkpoint["distillation"]["method"] == "consistency_training" and checkpoint["distillation"]["steps"] == 2

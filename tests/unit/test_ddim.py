"""DDIM: determinism, inversion, the DDPM limit, the Gaussian oracle, σ variants."""

import pytest
import torch

from difflab.samplers import AncestralSampler, DDIMSampler, sample_loop
from difflab.schedules import GaussianDiffusion
from tests.unit.test_samplers import MU, STD, gaussian_eps_oracle


def test_eta_zero_is_deterministic_from_the_same_noise():
    diffusion = GaussianDiffusion(num_timesteps=100)
    sampler = DDIMSampler(diffusion, steps=10, eta=0.0, clip_denoised=False)
    noise = torch.randn(16, 1, 2, 2)
    runs = [
        sample_loop(gaussian_eps_oracle(diffusion), sampler, noise.shape, torch.Generator().manual_seed(s), noise=noise)
        for s in (0, 1)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)  # the generator is never used


def test_encode_then_decode_reproduces_the_sample():
    diffusion = GaussianDiffusion(num_timesteps=1000)
    model_fn = gaussian_eps_oracle(diffusion)
    x0 = MU + STD * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    errors = {}
    for steps in (100, 1000):
        sampler = DDIMSampler(diffusion, steps=steps, eta=0.0, clip_denoised=False, spacing="even")
        x_T = sampler.encode(model_fn, x0)
        assert x_T.std().item() == pytest.approx(1.0, abs=0.1)  # the latent is (about) standard normal
        errors[steps] = (sample_loop(model_fn, sampler, x0.shape, noise=x_T) - x0).abs().max().item()
    assert errors[1000] < 1e-2  # 2% of the data's std, worst case over 256 values
    assert errors[1000] < errors[100] / 5  # first order: the round-trip error shrinks with the step size


def test_eta_one_at_full_length_is_the_ddpm_update():
    diffusion = GaussianDiffusion(num_timesteps=50)
    ddim = DDIMSampler(diffusion, eta=1.0, clip_denoised=False, spacing="even")
    ddpm = AncestralSampler(diffusion, variance_type="fixed_small", clip_denoised=False)
    x = torch.randn(8, 1, 3, 3)
    out = torch.randn_like(x)
    for t in (1, 10, 49):
        a = ddim.step(out, t, x, torch.Generator().manual_seed(t)).prev_sample
        b = ddpm.step(out, t, x, torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ddim._table["sigma"][1:] ** 2, diffusion.posterior_variance[1:], rtol=1e-5, atol=1e-9)


def test_oracle_ddim_recovers_the_distribution_as_steps_grow():
    """With the exact ε of N(MU, STD²) data, η = 0 DDIM keeps the mean at every S; its variance converges at first
    order in the step size (DDIM is Euler's method on the probability-flow ODE in (σ, x/sqrt(ᾱ)) coordinates):
    measured std ratios 0.61 (S=10), 0.80 (20), 0.92 (50), 0.96 (100), 1.00 (1000) on DDPM's linear schedule."""
    diffusion = GaussianDiffusion(num_timesteps=1000)
    ratios = {}
    for steps in (10, 100, 1000):
        sampler = DDIMSampler(diffusion, steps=steps, eta=0.0, clip_denoised=False, spacing="even")
        x = sample_loop(gaussian_eps_oracle(diffusion), sampler, (20000, 1), generator=torch.Generator().manual_seed(0))
        assert x.mean().item() == pytest.approx(MU, abs=0.01)
        ratios[steps] = x.std().item() / STD
    assert 0.5 < ratios[10] < ratios[100] < ratios[1000]
    assert ratios[100] == pytest.approx(1.0, abs=0.05) and ratios[1000] == pytest.approx(1.0, abs=0.01)


def test_oracle_ddim_is_exact_for_a_point_mass_at_ten_steps():
    """For data concentrated at MU the ODE is linear in σ, so DDIM's Euler steps are exact even at S = 10."""
    diffusion = GaussianDiffusion(num_timesteps=1000)

    def point_mass_eps(x, t):
        ab = diffusion.extract(diffusion.alphas_cumprod, t, x)
        return (x - ab.sqrt() * MU) / (1 - ab).sqrt()

    sampler = DDIMSampler(diffusion, steps=10, eta=0.0, clip_denoised=False)
    x = sample_loop(point_mass_eps, sampler, (1000, 1), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, torch.full_like(x, MU), rtol=0, atol=1e-4)


def test_sigma_hat_is_ancestral_fixed_large_on_the_same_steps():
    """σ̂ = sqrt(1 − ᾱ_τi/ᾱ_τi−1) around the posterior mean of the jump (the DDIM code's ``ddpm_steps``): the same
    numbers as the respaced ancestral sampler with σ² = β from the same x_t, output and generator."""
    diffusion = GaussianDiffusion(num_timesteps=1000)
    ddim = DDIMSampler(diffusion, steps=10, sigma="hat", spacing="leading")
    ddpm = AncestralSampler(diffusion, steps=10, variance_type="fixed_large", spacing="leading")
    ab = diffusion.alphas_cumprod_64[ddim.timesteps.flip(0)]
    torch.testing.assert_close(ddim._table["sigma"][1:].double(), (1 - ab[1:] / ab[:-1]).sqrt(), rtol=1e-5, atol=1e-7)
    x = torch.randn(8, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    out = torch.randn(8, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    for t in ddim.timesteps.tolist():
        a = ddim.step(out, t, x, torch.Generator().manual_seed(t)).prev_sample
        b = ddpm.step(out, t, x, torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_ddim_arguments_name_the_key():
    diffusion = GaussianDiffusion(num_timesteps=10)
    with pytest.raises(ValueError, match="sampler.eta"):
        DDIMSampler(diffusion, eta=-1)
    with pytest.raises(ValueError, match="sampler.sigma"):
        DDIMSampler(diffusion, sigma="tilde")

"""The sampler contract, determinism, and DDPM recovering a known distribution with a perfect ε-oracle."""

import pytest
import torch

from difflab.samplers import AncestralSampler, sample_loop, spaced_timesteps
from difflab.schedules import GaussianDiffusion

MU, STD = 0.5, 0.3


def gaussian_eps_oracle(diffusion: GaussianDiffusion):
    """E[ε | x_t] for data x_0 ~ N(MU, STD²): sqrt(1-ᾱ)(x_t - sqrt(ᾱ) MU) / (ᾱ STD² + 1 - ᾱ)."""

    def model_fn(x, t):
        ab = diffusion.extract(diffusion.alphas_cumprod, t, x).double()
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * MU) / (ab * STD**2 + 1 - ab)
        return eps.float()

    return model_fn


def test_spaced_timesteps_include_both_ends():
    assert spaced_timesteps(1000, 1000).tolist() == list(range(1000))
    steps = spaced_timesteps(1000, 10)
    assert steps[0] == 0 and steps[-1] == 999 and len(set(steps.tolist())) == 10
    with pytest.raises(ValueError, match="sampler.steps"):
        spaced_timesteps(1000, 0)


def test_set_timesteps_descending_and_step_index():
    sampler = AncestralSampler(GaussianDiffusion(num_timesteps=100), steps=10)
    assert sampler.timesteps[0] == 99 and sampler.timesteps[-1] == 0
    assert torch.all(sampler.timesteps[1:] < sampler.timesteps[:-1])
    assert sampler.step_index(0) == 0
    with pytest.raises(ValueError, match="not in this sampler's sequence"):
        sampler.step_index(1)


def test_full_table_equals_the_process_buffers():
    diffusion = GaussianDiffusion(num_timesteps=50)
    sampler = AncestralSampler(diffusion)
    torch.testing.assert_close(sampler._table["coef_x0"], diffusion.posterior_mean_coef1)
    torch.testing.assert_close(sampler._table["coef_xt"], diffusion.posterior_mean_coef2)
    torch.testing.assert_close(sampler._table["log_variance_small"], diffusion.posterior_log_variance_clipped)
    torch.testing.assert_close(sampler._table["log_variance_large"][1:], diffusion.betas[1:].log())


def test_sampling_is_deterministic_under_a_seed():
    diffusion = GaussianDiffusion(num_timesteps=100)
    sampler = AncestralSampler(diffusion, clip_denoised=False)
    model_fn = gaussian_eps_oracle(diffusion)
    draws = [sample_loop(model_fn, sampler, (8, 1, 2, 2), generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)
    other = sample_loop(model_fn, sampler, (8, 1, 2, 2), generator=torch.Generator().manual_seed(4))
    assert not torch.equal(draws[0], other)


def oracle_samples(variance_type: str, steps: int) -> torch.Tensor:
    diffusion = GaussianDiffusion(num_timesteps=1000)
    sampler = AncestralSampler(diffusion, variance_type=variance_type, clip_denoised=False, steps=steps)
    return sample_loop(gaussian_eps_oracle(diffusion), sampler, (20000, 1), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_perfect_oracle_recovers_the_data_distribution(variance_type):
    x = oracle_samples(variance_type, 1000)
    assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert x.std().item() == pytest.approx(STD, rel=0.03)


def test_respaced_sampling_with_the_oracle():
    """With K=100 < T steps the mean stays exact; σ²=β keeps the spread, σ²=β̃ shrinks it (the known
    under-dispersion of the small fixed variance at few steps, Nichol & Dhariwal §4)."""
    large, small = oracle_samples("fixed_large", 100), oracle_samples("fixed_small", 100)
    for x in (large, small):
        assert x.mean().item() == pytest.approx(MU, abs=0.01)
    assert large.std().item() == pytest.approx(STD, rel=0.05)
    assert small.std().item() < 0.95 * STD


def test_no_noise_at_the_last_step():
    diffusion = GaussianDiffusion(num_timesteps=10)
    sampler = AncestralSampler(diffusion, clip_denoised=False)
    x = torch.randn(4, 1, 2, 2)
    outputs = [sampler.step(torch.zeros_like(x), 0, x, torch.Generator().manual_seed(s)).prev_sample for s in (0, 1)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_variance_override_only_between_fixed_types():
    diffusion = GaussianDiffusion(num_timesteps=10)
    with pytest.raises(ValueError, match="sampler.variance_type"):
        AncestralSampler(diffusion, model_variance_type="learned_range", variance_type="fixed_small")
    with pytest.raises(ValueError, match="sampler.variance_type"):
        AncestralSampler(diffusion, variance_type="bogus")


def test_learned_range_interpolates_log_variances():
    diffusion = GaussianDiffusion(num_timesteps=10)
    sampler = AncestralSampler(diffusion, model_variance_type="learned_range")
    i = 5
    small, large = sampler._table["log_variance_small"][i], sampler._table["log_variance_large"][i]
    for v, expected in ((-1.0, small), (1.0, large), (0.0, (small + large) / 2)):
        got = sampler.log_variance(i, torch.full((1, 1, 1, 1), v))
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    "spacing, expected",
    [
        ("even", [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
        ("leading", [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),
        ("ddim_uniform", [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),
        ("trailing", [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]),
        ("quadratic", [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]),  # as the DDIM code (numpy) gives
    ],
)
def test_spacing_reference_values(spacing, expected):
    steps = spaced_timesteps(1000, 10, spacing)
    assert steps.tolist() == expected
    sampler = AncestralSampler(GaussianDiffusion(num_timesteps=1000), steps=10, spacing=spacing)
    assert torch.all(sampler.timesteps[1:] < sampler.timesteps[:-1])  # strictly decreasing


def test_leading_spacing_and_bad_spacings():
    assert spaced_timesteps(1000, 50, "leading").tolist() == list(range(0, 1000, 20))
    with pytest.raises(ValueError, match="sampler.spacing=quadratic"):
        spaced_timesteps(100, 100, "quadratic")
    with pytest.raises(ValueError, match="sampler.spacing"):
        spaced_timesteps(100, 10, "cubic")

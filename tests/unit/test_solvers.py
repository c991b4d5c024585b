"""The continuous-time solvers: closed forms, equivalences with DDIM, convergence orders on Gaussian data (whose
probability-flow ODE has a closed-form solution), statistics of the stochastic ones, NFE counting, error paths."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.samplers import (
    DDIMSampler,
    DPMSolverMultistepSampler,
    DPMSolverSDESampler,
    EulerAncestralSampler,
    EulerMaruyamaSampler,
    EulerSampler,
    HeunSampler,
    UniPCSampler,
    sample_loop,
)
from difflab.samplers.guidance import classifier_free_guidance
from difflab.schedules import GaussianDiffusion, NoiseLevel, Parameterization, score, x0_eps_from_output
from tests.parity.test_solvers_diffusers import GaussianData

SOLVERS = {
    "euler": (EulerSampler, {}),
    "heun": (HeunSampler, {}),
    "euler_ancestral": (EulerAncestralSampler, {}),
    "euler_maruyama": (EulerMaruyamaSampler, {}),
    "dpmpp_2m": (DPMSolverMultistepSampler, {"order": 2}),
    "dpmpp_3m": (DPMSolverMultistepSampler, {"order": 3}),
    "dpmpp_2m_sde": (DPMSolverSDESampler, {"order": 2}),
    "unipc": (UniPCSampler, {"order": 2}),
}


def solver(name: str, diffusion: GaussianDiffusion, **kwargs):
    cls, defaults = SOLVERS[name]
    return cls(diffusion=diffusion, **{"clip_denoised": False, **defaults, **kwargs})


@pytest.fixture(scope="module")
def linear():
    return GaussianDiffusion("linear")


# ---------------------------------------------------------------------- the continuous view
def test_sigma_lambda_and_the_sigma_to_t_map(linear):
    view = linear.continuous
    ab = linear.alphas_cumprod_64
    torch.testing.assert_close(view.sigmas, ((1 - ab) / ab).sqrt())
    torch.testing.assert_close(view.lambdas, 0.5 * torch.log(ab / (1 - ab)))  # λ = log(α/s) = half the log-SNR
    torch.testing.assert_close(view.sigma_to_t(view.sigmas), torch.arange(1000, dtype=torch.float64))
    geometric_mean = (view.sigmas[3] * view.sigmas[4]).sqrt()  # the midpoint in log σ
    assert float(view.sigma_to_t(geometric_mean)) == pytest.approx(3.5, abs=1e-12)
    t = torch.tensor([0.0, 0.25, 17.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(view.sigma_to_t(view.t_to_sigma(t)), t)
    assert float(view.sigma_to_t(torch.tensor(1e9))) == 999 and float(view.sigma_to_t(torch.tensor(1e-9))) == 0


def test_noise_level_from_sigma_is_the_tabulated_one(linear):
    t = torch.tensor([0, 500, 999])
    table = linear.noise_level(t, torch.zeros(3, 1))
    for k, tk in enumerate(t.tolist()):
        level = NoiseLevel.from_sigma(float(linear.continuous.sigmas[tk]))
        for name in ("alpha", "std", "recip_alpha", "sigma"):
            assert getattr(level, name) == pytest.approx(float(getattr(table, name)[k]), rel=1e-6)
    assert NoiseLevel.from_sigma(0.0).lambda_ == math.inf


@pytest.mark.parametrize("parameterization", list(Parameterization))
def test_score_of_the_exact_denoiser_is_the_gaussian_score(linear, parameterization):
    """Tweedie: −ε̂/s from any parameterisation equals ∇ log N(x; α μ, α² s_0² + s²) of Gaussian data."""
    data = GaussianData(linear)
    t = torch.full((2,), 400.0)
    x_t = torch.randn(data.mu.shape, dtype=torch.float64)
    level = NoiseLevel.from_sigma(float(linear.continuous.sigmas[400]))
    output = data.model_fn(parameterization.value, torch.float64)(x_t, t)
    _, eps = x0_eps_from_output(parameterization, output, x_t, level)
    expected = -(x_t - level.alpha * data.mu) / (level.alpha**2 * data.s**2 + level.std**2)
    torch.testing.assert_close(score(eps, level), expected)


# ---------------------------------------------------------------------- equal to DDIM where the maths says so
def random_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in network: its x̂_0 leaves [-1, 1], so clipping matters."""
    return torch.tanh(1.5 * x + t.float().reshape(-1, 1, 1, 1) / 300) * 1.3


@pytest.mark.parametrize(
    "name, kwargs, eta",
    [
        ("euler", {}, 0.0),  # Euler in σ is DDIM (Karras et al. §3)
        ("dpmpp_2m", {"order": 1}, 0.0),  # DPM-Solver++(1) is DDIM (Lu et al. 2022b)
        ("euler_ancestral", {"eta": 1.0}, 1.0),  # the ancestral step is the DDPM posterior (DDIM η)
        ("euler_ancestral", {"eta": 0.5}, 0.5),
        ("dpmpp_2m_sde", {"order": 1}, 1.0),  # SDE-DPM-Solver++(1) is DDIM with η = 1
    ],
)
@pytest.mark.parametrize("clip", [False, True])
def test_first_order_solvers_are_ddim_on_the_models_timesteps(linear, name, kwargs, eta, clip):
    shape = (3, 1, 4, 4)
    ddim = DDIMSampler(diffusion=linear, steps=10, eta=eta, spacing="trailing", clip_denoised=clip)
    ours = solver(name, linear, steps=10, spacing="trailing", clip_denoised=clip, **kwargs)
    noise = torch.randn(shape)
    a = sample_loop(random_model, ddim, shape, generator=torch.Generator().manual_seed(0), noise=noise)
    b = sample_loop(random_model, ours, shape, generator=torch.Generator().manual_seed(0), noise=noise)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------- accuracy on Gaussian data
@pytest.mark.parametrize(
    "name, kwargs, min_ratio, max_ratio",
    [
        ("euler", {}, 1.7, 2.3),  # first order: halving the step halves the error
        ("heun", {}, 3.5, 6.0),  # second order
        ("dpmpp_2m", {}, 3.3, 6.0),
        ("dpmpp_3m", {}, 5.0, 20.0),
        ("unipc", {}, 5.0, 20.0),  # UniC raises UniP-2 to third order
    ],
)
def test_convergence_order_against_the_exact_ode_solution(linear, name, kwargs, min_ratio, max_ratio):
    data = GaussianData(linear)
    errors = []
    for steps in (16, 32):
        sampler = solver(name, linear, steps=steps, sigma_schedule="karras", sigma_max=80.0, **kwargs)
        x = sample_loop(data.model_fn("eps", torch.float64), sampler, data.noise.shape, noise=data.noise.double())
        errors.append((x.double() - data.ode_solution(float(sampler.sigmas[0]))).abs().max().item())
    assert min_ratio < errors[0] / errors[1] < max_ratio, errors


@pytest.mark.parametrize("name", ["euler_ancestral", "euler_maruyama", "dpmpp_2m_sde"])
def test_stochastic_samplers_reach_the_data_distribution(name):
    """Gaussian data N(μ, s²) with the exact denoiser: 250 steps give the data's mean and std (20,000 samples).
    (Ancestral steps under-disperse by O(1/steps): their fixed posterior variance ignores the spread of x_0 | x_t.)"""
    diffusion = GaussianDiffusion("linear", num_timesteps=1000)
    mu, s = 0.3, 0.5

    def model(x, t):  # exact ε̂ of N(μ, s²) data
        sigma = diffusion.continuous.t_to_sigma(t.double()).reshape(-1, 1, 1, 1)
        alpha = (1 + sigma**2).rsqrt()
        std = sigma * alpha
        x0 = mu + alpha * s**2 / (alpha**2 * s**2 + std**2) * (x.double() - alpha * mu)
        return ((x.double() - alpha * x0) / std).float()

    sampler = solver(name, diffusion, steps=250, spacing="trailing")
    x = sample_loop(model, sampler, (20000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    assert float(x.mean()) == pytest.approx(mu, abs=0.02)
    assert float(x.std()) == pytest.approx(s, rel=0.04)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_parameterisation_gives_the_same_chain(linear, name):
    data = GaussianData(linear)
    finals = []
    for parameterization in ("eps", "x0", "v"):
        sampler = solver(name, linear, steps=8, parameterization=parameterization, spacing="trailing")
        g = torch.Generator().manual_seed(0)
        finals.append(sample_loop(data.model_fn(parameterization), sampler, data.noise.shape, g, noise=data.noise))
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(finals[2], finals[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_thresholding_and_learned_variance_outputs(linear, name):
    """clip_denoised keeps every x̂_0 in [-1, 1] (so the result too); dynamic thresholding bounds it by the percentile
    scale; a learned-range model's variance channels are ignored by the solvers."""
    shape = (2, 1, 4, 4)
    noise = torch.randn(shape)

    def run(model, **kwargs):
        sampler = solver(name, linear, steps=6, spacing="trailing", **kwargs)
        return sample_loop(model, sampler, shape, torch.Generator().manual_seed(0), noise=noise)

    wild = lambda x, t: 3 * torch.tanh(x)  # noqa: E731  (x̂_0 far outside [-1, 1])
    assert run(wild, clip_denoised=True).abs().max() <= 1 + 1e-6
    assert run(wild, clip_denoised=True, dynamic_threshold=0.9).abs().max() <= 1 + 1e-6
    doubled = lambda x, t: torch.cat([random_model(x, t), torch.full_like(x, 0.3)], dim=1)  # noqa: E731
    torch.testing.assert_close(run(doubled, model_variance_type="learned_range"), run(random_model))


# ---------------------------------------------------------------------- the contract
@pytest.mark.parametrize("name", list(SOLVERS))
def test_nfe_is_counted_and_state_is_reset(linear, name):
    sampler = solver(name, linear, steps=5, sigma_schedule="karras")
    calls = []

    def model(x, t):
        calls.append(t)
        return random_model(x, t)

    noise = torch.randn(2, 1, 4, 4)
    a = sample_loop(model, sampler, noise.shape, torch.Generator().manual_seed(0), noise=noise)
    expected = 2 * 5 - 1 if name == "heun" else 5
    assert sampler.nfe == len(calls) == len(sampler.timesteps) == sampler.num_evaluations(5) == expected
    assert all(t.dtype == torch.float32 for t in calls) and any(float(t[0]) % 1 for t in calls)  # fractional t
    b = sample_loop(model, sampler, noise.shape, torch.Generator().manual_seed(0), noise=noise)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # set_timesteps resets the multistep history


def test_guidance_runs_one_2b_batch_per_evaluation(linear):
    batches = []

    def labelled(x, t, y):
        batches.append(x.shape[0])
        return random_model(x, t) + 0.1 * y.float().reshape(-1, 1, 1, 1)

    guided = classifier_free_guidance(labelled, torch.tensor([1, 2]), null_label=10, guidance_scale=3.0)
    sampler = solver("dpmpp_2m", linear, steps=6)
    x = sample_loop(guided, sampler, (2, 1, 4, 4), torch.Generator().manual_seed(0))
    assert batches == [4] * 6 and sampler.nfe == 6 and torch.isfinite(x).all()


def test_steps_out_of_order_or_after_the_end_fail(linear):
    sampler = solver("euler", linear, steps=3)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="expected t="):
        sampler.step(x, float(sampler.timesteps[1]), x)
    for t in sampler.timesteps.tolist():
        sampler.step(x, t, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        sampler.step(x, float(sampler.timesteps[0]), x)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("dpmpp_2m", {"order": 4}, "sampler.order=4: DPMSolverMultistepSampler has orders"),
        ("unipc", {"order": 1}, "sampler.order=1: UniPCSampler has orders"),
        ("dpmpp_3m", {"steps": 2}, r"sampler.steps=2: DPMSolverMultistepSampler\(order=3\) needs steps >= 3"),
        ("unipc", {"order": 3, "steps": 2}, "needs steps >= 3"),
        ("euler", {"steps": 1001}, "expected 1 <= steps <= T=1000"),
        ("dpmpp_2m", {"steps": 5000, "sigma_schedule": "karras"}, "sampler.steps=5000: expected 1 <= steps <= T=1000"),
        ("heun", {"steps": 1001, "sigma_schedule": "uniform_lambda"}, "expected 1 <= steps <= T=1000"),
        ("heun", {"sigma_schedule": "karras", "sigma_max": 0.005}, "sampler.sigma_max=0.005: below the model's"),
        ("dpmpp_2m", {"sigma_schedule": "karras", "sigma_min": 1e-4}, "sampler.sigma_min=0.0001: outside"),
        ("euler", {"sigma_max": 10.0}, "sigma_schedule=karras|uniform_lambda"),
        ("euler", {"sigma_schedule": "karras", "sigma_min": 5.0, "sigma_max": 2.0}, "must be below"),
        ("euler", {"sigma_schedule": "exponential"}, r"sampler.sigma_schedule='exponential': expected one of"),
        ("euler_ancestral", {"eta": -1.0}, "sampler.eta=-1.0"),
    ],
)
def test_bad_configuration_fails_at_construction(linear, name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        solver(name, linear, **kwargs)


def test_sigma_max_is_capped_at_the_models_largest_sigma(linear):
    """EDM's σ_max = 80 on a schedule whose last σ is 157 starts at 80; on one that ends at 37 (scaled_linear) at 37."""
    assert float(solver("heun", linear, steps=5, sigma_schedule="karras", sigma_max=80.0).sigmas[0]) == 80.0
    small = GaussianDiffusion("scaled_linear")
    sampler = solver("heun", small, steps=5, sigma_schedule="karras", sigma_max=80.0)
    assert float(sampler.sigmas[0]) == pytest.approx(small.continuous.sigma_max)
    assert float(sampler.timesteps[0]) == pytest.approx(999.0)

"""Closed-form oracles on Gaussian data x_0 ~ N(MU, S²) per dimension: with the exact denoiser, the score-view
samplers (Langevin, predictor–corrector, the adaptive probability-flow ODE, EDM's churn) reach the data law, and the
ODE likelihood equals the analytic log-density (< 0.01 bits/dim), on every process with a σ view."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.losses import ode_log_likelihood
from difflab.samplers import (
    AnnealedLangevinSampler,
    EDMSampler,
    FlowODESampler,
    ODESampler,
    PredictorCorrectorSampler,
    sample_loop,
)
from difflab.schedules import GaussianDiffusion, RectifiedFlow, SigmaProcess

MU, S = 0.3, 0.5
SHAPE = (1000, 1, 2, 2)  # 4,000 values: the mean's standard error is S/63 = 0.008


def exact_x0(x_tilde: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x_0 | x̃ = x_0 + σ ε] for N(MU, S²) data."""
    return (S**2 * x_tilde + sigma**2 * MU) / (S**2 + sigma**2)


def sigma_model(process: SigmaProcess):
    """model(x̃, σ) = D(x̃; σ) (an EDM-family module's output)."""
    return lambda x, t: exact_x0(x, t.double().reshape(-1, 1, 1, 1)).float()


def vp_model(diffusion: GaussianDiffusion):
    """model(x_t, t) = ε̂ of a discrete VP diffusion (any t: its σ by log-σ interpolation)."""

    def fn(x, t):
        sigma = diffusion.continuous.t_to_sigma(t.double()).reshape(-1, 1, 1, 1)
        x_tilde = x.double() * (1 + sigma**2).sqrt()
        return ((x_tilde - exact_x0(x_tilde, sigma)) / sigma).float()

    return fn


def flow_model(flow: RectifiedFlow):
    """model(x_τ, T τ) = E[ε − x_0 | x_τ] for x_τ = (1 − τ) x_0 + τ ε."""

    def fn(x, t):
        tau = (t.double() / flow.num_timesteps).reshape(-1, 1, 1, 1)
        var = (1 - tau) ** 2 * S**2 + tau**2
        centred = x.double() - (1 - tau) * MU
        x0 = MU + (1 - tau) * S**2 / var * centred
        eps = tau / var * centred
        return (eps - x0).float()

    return fn


def assert_data_law(samples: torch.Tensor, tol_mean: float = 0.035, tol_std: float = 0.03) -> None:
    assert torch.isfinite(samples).all()
    assert abs(float(samples.mean()) - MU) < tol_mean, float(samples.mean())
    assert abs(float(samples.std()) - S) < tol_std, float(samples.std())


def draw(model, sampler, seed: int = 0) -> torch.Tensor:
    return sample_loop(model, sampler, SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preconditioning", ["edm", "ve", "vp"])
def test_adaptive_ode_reaches_the_data_law(preconditioning):
    process = SigmaProcess(preconditioning)
    sampler = ODESampler(process, parameterization="x0", rtol=1e-5, atol=1e-5)
    assert_data_law(draw(sigma_model(process), sampler), tol_mean=0.03, tol_std=0.02)
    assert 10 < sampler.nfe < 400  # reported: the solver's own count


def test_adaptive_ode_on_a_discrete_vp_model_and_a_flow():
    diffusion = GaussianDiffusion("linear", 1000)
    sampler = ODESampler(diffusion, parameterization="eps")
    assert_data_law(draw(vp_model(diffusion), sampler), tol_mean=0.03, tol_std=0.02)
    flow = RectifiedFlow(1000)
    sampler = FlowODESampler(flow, parameterization="v")
    assert_data_law(draw(flow_model(flow), sampler), tol_mean=0.03, tol_std=0.02)


@pytest.mark.parametrize(
    "sampler_cls, kwargs",
    [
        (PredictorCorrectorSampler, {"steps": 100, "corrector_steps": 1, "snr": 0.16}),
        (PredictorCorrectorSampler, {"steps": 100, "corrector_steps": 0}),
        (PredictorCorrectorSampler, {"steps": 100, "predictor": "euler_maruyama", "corrector_steps": 1}),
        # corrector only: its last x_mean (score_sde's denoise) shrinks by 1 − 2 snr², so the noisy state is compared
        (PredictorCorrectorSampler, {"steps": 100, "predictor": "none", "corrector_steps": 10, "denoise": False}),
        (AnnealedLangevinSampler, {"steps": 30, "n_steps_each": 100, "step_size": 2e-5, "sigma_schedule": "model"}),
        (EDMSampler, {"steps": 30, "S_churn": 40, "S_tmin": 0.05, "S_tmax": 50, "sigma_schedule": "karras"}),
    ],
)
def test_score_samplers_reach_the_data_law_on_ve(sampler_cls, kwargs):
    process = SigmaProcess("ve", sigma_min=0.01, sigma_max=25.0)
    sampler = sampler_cls(process, parameterization="x0", **kwargs)
    assert_data_law(draw(sigma_model(process), sampler))
    assert sampler.nfe == sampler.num_evaluations()


def test_pc_on_a_discrete_vp_model():
    """The σ-space samplers take a DDPM ε-model (x = α x̃ at each level)."""
    diffusion = GaussianDiffusion("linear", 1000)
    sampler = PredictorCorrectorSampler(diffusion, parameterization="eps", steps=100, sigma_schedule="karras")
    assert_data_law(draw(vp_model(diffusion), sampler))


def analytic_log_density(x: torch.Tensor) -> torch.Tensor:
    return (-0.5 * ((x.double() - MU) / S) ** 2 - math.log(S) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)


def bits(log_p: torch.Tensor, dims: int) -> torch.Tensor:
    return -log_p / (dims * math.log(2))


@pytest.mark.parametrize("process_name", ["edm", "ve", "vp_discrete", "flow"])
def test_ode_likelihood_equals_the_analytic_density(process_name):
    """Rademacher probes are exact here (the Jacobian of the exact field is diagonal): < 0.01 bits/dim per image."""
    x = MU + S * torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    if process_name == "vp_discrete":
        diffusion = GaussianDiffusion("linear", 1000)
        model, sampler = vp_model(diffusion), ODESampler(diffusion, parameterization="eps")
    elif process_name == "flow":
        flow = RectifiedFlow(1000)
        model, sampler = flow_model(flow), FlowODESampler(flow, parameterization="v")
    else:
        process = SigmaProcess(process_name, sigma_min=0.002 if process_name == "ve" else None, sigma_max=100.0)
        model, sampler = sigma_model(process), ODESampler(process, parameterization="x0")
    log_p = ode_log_likelihood(model, sampler, x, "rademacher", torch.Generator().manual_seed(0))
    error = (bits(log_p.double(), 4) - bits(analytic_log_density(x), 4)).abs()
    assert float(error.max()) < 0.01, error


def test_gaussian_probes_are_unbiased_and_exact_trace_agrees():
    process = SigmaProcess("edm")
    x = MU + S * torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(4))
    model = sigma_model(process)
    exact = ode_log_likelihood(model, ODESampler(process, parameterization="x0"), x[:4], "exact")
    torch.testing.assert_close(exact.double(), analytic_log_density(x[:4]), atol=0.02, rtol=0)
    gaussian = ode_log_likelihood(model, ODESampler(process, parameterization="x0"), x, "gaussian", torch.Generator())
    difference = gaussian.double() - analytic_log_density(x)
    assert abs(float(difference.mean())) < 4 * float(difference.std()) / 8 + 0.02  # within 4 standard errors


def test_ncsn_sigma_max_is_the_largest_pairwise_distance():
    """Song & Ermon 2020, Technique 1, exactly: the chunked search equals torch.pdist's maximum."""
    from difflab.schedules import ncsn_sigma_max

    images = torch.rand(50, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert math.isclose(ncsn_sigma_max(images, chunk=7), float(torch.pdist(images.flatten(1).double()).max()))

"""Closed-form checks of the diffusion process math."""

import math

import pytest
import torch

from difflab.schedules import BetaSchedule, GaussianDiffusion, Parameterization, make_betas, posterior_terms


def test_linear_schedule_reference_points():
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    assert betas[499].item() == pytest.approx(1e-4 + 499 * (0.02 - 1e-4) / 999)
    # ᾱ_T of DDPM's schedule (Ho et al. §4: "L_T ≈ 1e-5 bits"): ᾱ_T ≈ 4.04e-5
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_scaled_linear_is_latent_diffusions_linear():
    betas = make_betas("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    sqrt = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64)
    torch.testing.assert_close(betas, sqrt**2)
    assert betas[0].item() == pytest.approx(0.00085)
    assert betas[-1].item() == pytest.approx(0.012)


def test_cosine_schedule_matches_definition():
    T, s = 1000, 0.008
    betas = make_betas("cosine", T, cosine_s=s)
    alphas_cumprod = torch.cumprod(1 - betas, 0)

    def f(t):
        return math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2

    for t in (1, 10, 500, 900):  # paper t is our index t - 1
        assert alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)  # clipped at the end


@pytest.mark.parametrize("schedule", list(BetaSchedule))
def test_alphas_cumprod_monotone(schedule):
    diffusion = GaussianDiffusion(schedule, 1000, beta_start=1e-4, beta_end=0.02)
    ab = diffusion.alphas_cumprod
    assert torch.all(ab[1:] < ab[:-1]) and 0 < ab[-1] < ab[0] < 1


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(beta_start=0.0), "schedule.beta_start"),
        (dict(beta_end=1.5), "schedule.beta_end"),
        (dict(beta_start=0.05, beta_end=0.02), "schedule.beta_end"),
        (dict(num_timesteps=0), "schedule.num_timesteps"),
        (dict(beta_schedule="quadratic"), "schedule.beta_schedule"),
        (dict(beta_schedule="cosine", max_beta=1.0), "schedule.max_beta"),
    ],
)
def test_bad_schedule_values_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        GaussianDiffusion(**kwargs)


def test_buffers_are_not_persistent_and_follow_device():
    diffusion = GaussianDiffusion(num_timesteps=10)
    assert diffusion.state_dict() == {}
    assert "alphas_cumprod" in dict(diffusion.named_buffers())


def test_q_sample_equals_iterating_the_chain():
    """q(x_t|x_0) in closed form vs t one-step transitions x_s = sqrt(1-β_s) x_{s-1} + sqrt(β_s) z."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(num_timesteps=200)
    n, t = 200_000, 150
    x0 = torch.full((n, 1), 0.7)
    x = x0.clone()
    for s in range(t + 1):
        beta = diffusion.betas[s]
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn_like(x)
    closed = diffusion.q_sample(x0, torch.full((n,), t), torch.randn_like(x0))
    mean, var = diffusion.q_mean_variance(x0[:1], torch.tensor([t]))
    for sample in (x, closed):
        assert sample.mean().item() == pytest.approx(mean.item(), abs=4e-3)
        assert sample.var().item() == pytest.approx(var.item(), rel=1e-2)


def test_posterior_equals_bayes():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): the Gaussian product in closed form (Lemma 3.15)."""
    diffusion = GaussianDiffusion(num_timesteps=1000)
    betas64 = make_betas("linear", 1000)
    ab64 = torch.cumprod(1 - betas64, 0)
    x0, xt = torch.tensor([[0.3], [-0.8]]), torch.tensor([[1.1], [0.2]])
    for t in (1, 10, 500, 999):
        tt = torch.full((2,), t)
        beta, ab_prev = betas64[t], ab64[t - 1]
        # likelihood in x_{t-1}: N(x_t; sqrt(1-β) x_{t-1}, β) ; prior: N(sqrt(ᾱ_{t-1}) x0, 1-ᾱ_{t-1})
        precision = (1 - beta) / beta + 1 / (1 - ab_prev)
        var = 1 / precision
        mean = var * ((1 - beta).sqrt() * xt.double() / beta + ab_prev.sqrt() * x0.double() / (1 - ab_prev))
        got_mean, got_var, got_logvar = diffusion.q_posterior_mean_variance(x0, xt, tt)
        torch.testing.assert_close(got_mean.double(), mean, rtol=1e-5, atol=1e-6)
        assert got_var[0].item() == pytest.approx(var.item(), rel=1e-5)
        assert got_logvar[0].item() == pytest.approx(math.log(var.item()), rel=1e-5)


def test_posterior_log_variance_clipped_at_first_step():
    diffusion = GaussianDiffusion(num_timesteps=100)
    assert diffusion.posterior_variance[0].item() == 0.0
    assert diffusion.posterior_log_variance_clipped[0].item() == pytest.approx(
        math.log(diffusion.posterior_variance[1].item())
    )


def test_posterior_terms_of_a_jump_compose_two_steps():
    """The respaced posterior q(x_s|x_t,x_0) for s = t-2 has the variance of the two-step Bayes product."""
    ab = torch.cumprod(1 - make_betas("linear", 100), 0)
    terms = posterior_terms(ab[10:11], ab[8:9])
    beta_jump = 1 - ab[10] / ab[8]
    expected = beta_jump * (1 - ab[8]) / (1 - ab[10])
    assert terms["variance"].item() == pytest.approx(expected.item())
    assert terms["betas"].item() == pytest.approx(beta_jump.item())


@pytest.mark.parametrize("param", list(Parameterization))
def test_parameterisations_round_trip(param):
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(num_timesteps=1000)
    x0, eps = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([0, 10, 500, 999])
    xt = diffusion.q_sample(x0, t, eps)
    target = diffusion.training_target(param, x0, eps, t)
    pred_x0, pred_eps = diffusion.predict_x0_eps(param, target, xt, t)
    tol = dict(rtol=1e-3, atol=2e-3) if param is Parameterization.X0 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred_x0, x0, **tol)
    torch.testing.assert_close(pred_eps, eps, **(dict(rtol=1e-3, atol=5e-2) if param is Parameterization.X0 else tol))


def test_clip_denoised_keeps_x0_and_eps_consistent():
    diffusion = GaussianDiffusion(num_timesteps=1000)
    xt, t = torch.randn(3, 1, 4, 4) * 3, torch.tensor([999, 999, 999])
    x0, eps = diffusion.predict_x0_eps(Parameterization.EPS, torch.zeros_like(xt), xt, t, clip_denoised=True)
    assert x0.abs().max() <= 1.0
    torch.testing.assert_close(diffusion.q_sample(x0, t, eps), xt, rtol=1e-4, atol=1e-4)

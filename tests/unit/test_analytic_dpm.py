"""Analytic-DPM (Bao et al. 2022): the optimal reverse variance against Gaussian data, where everything is exact.

Data x_0 ~ N(μ, s² I): x_n = sqrt(ᾱ_n) x_0 + sqrt(β̄_n) ε is Gaussian with variance ᾱ_n s² + β̄_n per dimension, the
exact ε̂(x_n) = E[ε | x_n] = sqrt(β̄_n)(x_n − sqrt(ᾱ_n) μ)/(ᾱ_n s² + β̄_n), so Γ_n = β̄_n/(ᾱ_n s² + β̄_n); and the
optimal σ² of the reverse step n → s (Theorem 1: E_q tr Cov[x_s | x_n]/d, the model mean being E[x_s | x_n] exactly)
is the Gaussian conditional variance Var(x_s) − Cov(x_s, x_n)²/Var(x_n), computed here from the joint law of
(x_s, x_n) alone, without the paper's formula.
"""

from __future__ import annotations

import math

import pytest
import torch

from difflab.samplers import AncestralSampler, DDIMSampler, EulerSampler, spaced_timesteps
from difflab.samplers.analytic import (
    analytic_variance,
    gamma_path,
    last_noise_bound,
    read_gamma,
    verify_gamma_weights,
)
from difflab.schedules import GaussianDiffusion, SigmaProcess
from difflab.tasks.analytic import estimate_gamma, write_gamma

MU, S = 0.3, 0.5
SHAPE = (1, 4, 4)  # d = 16


def exact_gamma(ab: torch.Tensor) -> torch.Tensor:
    return (1.0 - ab) / (ab * S**2 + 1.0 - ab)


def exact_eps(diffusion: GaussianDiffusion):
    ab_all = diffusion.alphas_cumprod_64

    def eps(x_n: torch.Tensor, n: torch.Tensor, condition=None) -> torch.Tensor:
        ab = ab_all[n.cpu()].reshape(-1, 1, 1, 1).to(x_n.device)
        return ((1.0 - ab).sqrt() * (x_n.double() - ab.sqrt() * MU) / (ab * S**2 + 1.0 - ab)).float()

    return eps


def jumps(diffusion: GaussianDiffusion, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(τ ascending, ᾱ_τ, ᾱ_prev) of a respaced chain, float64."""
    tau = spaced_timesteps(diffusion.num_timesteps, steps)
    ab = diffusion.alphas_cumprod_64[tau]
    return tau, ab, torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])


def gaussian_conditional_variance(ab: torch.Tensor, ab_prev: torch.Tensor, lambda2: torch.Tensor) -> torch.Tensor:
    """Var(x_s | x_n) per dimension under q_λ: x_s = sqrt(ᾱ_s) x_0 + sqrt(β̄_s − λ²) ε + λ z with x_n's own ε."""
    var_s, var_n = ab_prev * S**2 + 1.0 - ab_prev, ab * S**2 + 1.0 - ab
    cov = (ab_prev * ab).sqrt() * S**2 + ((1.0 - ab_prev - lambda2).clamp(min=0) * (1.0 - ab)).sqrt()
    return var_s - cov**2 / var_n


def markov_conditional_variance(ab: torch.Tensor, ab_prev: torch.Tensor) -> torch.Tensor:
    """Var(x_s | x_n) of the Markov forward chain x_n = sqrt(α) x_s + sqrt(1 − α) w, α = ᾱ_n/ᾱ_s."""
    alpha, var_s = ab / ab_prev, ab_prev * S**2 + 1.0 - ab_prev
    return var_s - alpha * var_s**2 / (alpha * var_s + 1.0 - alpha)


@pytest.mark.parametrize("steps", [50, 7])  # every step, and a respaced τ
def test_optimal_variance_formula_on_gaussian_data(steps):
    diffusion = GaussianDiffusion(num_timesteps=50)
    _, ab, ab_prev = jumps(diffusion, steps)
    gamma = exact_gamma(ab)
    beta_tilde = (1.0 - ab / ab_prev) * (1.0 - ab_prev) / (1.0 - ab)
    for lambda2, expected in [
        (beta_tilde, markov_conditional_variance(ab, ab_prev)),  # Analytic-DDPM
        (torch.zeros_like(ab), gaussian_conditional_variance(ab, ab_prev, torch.zeros_like(ab))),  # DDIM η = 0
        (0.25 * beta_tilde, gaussian_conditional_variance(ab, ab_prev, 0.25 * beta_tilde)),  # DDIM η = 0.5
    ]:
        out = analytic_variance(ab, ab_prev, gamma, lambda2)
        torch.testing.assert_close(out["sigma2"][1:], expected[1:], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(out["sigma2"], out["unclipped"])  # s² < 1: Theorem 2's bounds do not bind


def test_monte_carlo_gamma_and_variance_on_gaussian_data():
    diffusion, M = GaussianDiffusion(num_timesteps=50), 1000
    generator = torch.Generator().manual_seed(0)
    x_start = MU + S * torch.randn((M, *SHAPE), generator=generator)
    gamma, stderr = estimate_gamma(exact_eps(diffusion), diffusion, x_start, None, 4096, generator)
    exact = exact_gamma(diffusion.alphas_cumprod_64)
    theory = exact * math.sqrt(2.0 / (math.prod(SHAPE) * M))  # ||ε̂||²/d ~ Γ χ²_d/d per pair
    torch.testing.assert_close(stderr, theory, rtol=0.15, atol=0)
    assert ((gamma - exact).abs() <= 5 * theory).all(), ((gamma - exact) / theory).abs().max()
    # σ² from the estimate, DDPM and DDIM on a respaced τ, within the propagated MC error
    tau, ab, ab_prev = jumps(diffusion, 7)
    beta_tilde = (1.0 - ab / ab_prev) * (1.0 - ab_prev) / (1.0 - ab)
    for lambda2 in (beta_tilde, torch.zeros_like(ab)):
        coef = (ab_prev.sqrt() - ((1.0 - ab_prev - lambda2) * ab / (1.0 - ab)).sqrt()) ** 2 * (1.0 - ab) / ab
        ours = analytic_variance(ab, ab_prev, gamma[tau], lambda2)["sigma2"]
        optimum = gaussian_conditional_variance(ab, ab_prev, lambda2)
        assert ((ours - optimum).abs()[1:] <= 5 * coef[1:] * theory[tau][1:]).all()


@pytest.mark.parametrize("sampler_class", [AncestralSampler, DDIMSampler])
def test_samplers_use_the_optimal_variance_on_their_own_steps(sampler_class):
    diffusion = GaussianDiffusion(num_timesteps=50)
    gamma = exact_gamma(diffusion.alphas_cumprod_64)
    sampler = sampler_class(
        diffusion, variance_type="analytic", gamma=gamma, steps=7, analytic_clip_pixels=math.inf, spacing="even"
    )
    _, ab, ab_prev = jumps(diffusion, 7)
    if sampler_class is AncestralSampler:
        sigma2 = sampler._table["log_variance_analytic"].double().exp()
        expected = markov_conditional_variance(ab, ab_prev)
    else:
        sigma2 = sampler._table["sigma"].double() ** 2
        expected = gaussian_conditional_variance(ab, ab_prev, torch.zeros_like(ab))
        assert not sampler.deterministic  # Analytic-DDIM adds noise at η = 0
    torch.testing.assert_close(sigma2[1:], expected[1:], rtol=1e-5, atol=0)
    assert sigma2[0] == 0  # the last step τ_1 → x_0 adds no noise


def test_clipping_to_theorem_2_bounds():
    diffusion = GaussianDiffusion(num_timesteps=100)
    _, ab, ab_prev = jumps(diffusion, 20)
    for lambda2 in ((1.0 - ab / ab_prev) * (1.0 - ab_prev) / (1.0 - ab), torch.zeros_like(ab)):
        for gamma in (torch.linspace(-3.0, 1.5, 20, dtype=torch.float64), torch.full((20,), 2.0), torch.zeros(20)):
            out = analytic_variance(ab, ab_prev, gamma.double(), lambda2)
            assert (out["sigma2"] >= out["lower"] - 1e-15).all() and (out["sigma2"] <= out["upper"] + 1e-15).all()
            inside = (out["unclipped"] >= out["lower"]) & (out["unclipped"] <= out["upper"])
            torch.testing.assert_close(out["sigma2"][inside], out["unclipped"][inside])
        above = analytic_variance(ab, ab_prev, torch.full((20,), 1.5, dtype=torch.float64), lambda2)
        torch.testing.assert_close(above["sigma2"], lambda2)  # Γ > 1: the lower bound λ²


@pytest.mark.parametrize(
    ("sampler_class", "schedule", "pixels"),
    [(AncestralSampler, "linear", 2.0), (AncestralSampler, "cosine", 1.0), (DDIMSampler, "linear", 1.0)],
)
def test_last_step_rule(sampler_class, schedule, pixels):
    """The authors' clip_sigma_idx=1: E|σ z| ≤ clip_pixel · 2/255 on the step into x_{τ_1}, no noise after it."""
    diffusion = GaussianDiffusion(beta_schedule=schedule, num_timesteps=1000)
    gamma = torch.full((1000,), 0.2, dtype=torch.float64)
    sampler = sampler_class(diffusion, variance_type="analytic", gamma=gamma, steps=10)
    free = sampler_class(diffusion, variance_type="analytic", gamma=gamma, steps=10, analytic_clip_pixels=math.inf)
    sigma = sampler._table["sigma"] if sampler_class is DDIMSampler else sampler._table["log_variance_analytic"]
    free_sigma = free._table["sigma"] if sampler_class is DDIMSampler else free._table["log_variance_analytic"]
    if sampler_class is AncestralSampler:
        sigma, free_sigma = (0.5 * sigma).exp(), (0.5 * free_sigma).exp()
    bound = math.sqrt(last_noise_bound(pixels))
    assert bound * math.sqrt(2 / math.pi) == pytest.approx(pixels * 2 / 255)
    assert free_sigma[1] > bound  # the rule binds here
    assert sigma[1].item() == pytest.approx(bound, rel=1e-6)
    torch.testing.assert_close(sigma[2:], free_sigma[2:])
    assert sigma[0] == 0


def test_gamma_file_round_trip_and_refusals(tmp_path):
    gamma = torch.linspace(0.1, 1.0, 20, dtype=torch.float64)
    path = write_gamma(tmp_path / "m.analytic.safetensors", gamma, gamma * 0.01, {"weights_sha256": "ab", "ckpt": "x"})
    loaded = read_gamma(path)
    assert torch.equal(loaded.gamma, gamma) and loaded.info["weights_sha256"] == "ab"
    assert gamma_path(tmp_path / "last.ckpt") == tmp_path / "last.analytic.safetensors"
    with pytest.raises(FileNotFoundError, match="python src/analytic.py ckpt="):
        read_gamma(tmp_path / "missing.analytic.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        read_gamma(tmp_path / "bad.safetensors")
    diffusion = GaussianDiffusion(num_timesteps=30)
    with pytest.raises(ValueError, match="T=30"):
        AncestralSampler(diffusion, variance_type="analytic", gamma=str(path))


def test_refusals():
    diffusion = GaussianDiffusion(num_timesteps=20)
    gamma = torch.full((20,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="python src/analytic.py"):
        AncestralSampler(diffusion, variance_type="analytic")  # no Γ
    with pytest.raises(ValueError, match="not a training one"):
        AncestralSampler(diffusion, model_variance_type="analytic")
    with pytest.raises(ValueError, match="its own variance"):
        DDIMSampler(diffusion, model_variance_type="learned_range", variance_type="analytic", gamma=gamma)
    with pytest.raises(ValueError, match="sigma=hat"):
        DDIMSampler(diffusion, variance_type="analytic", gamma=gamma, sigma="hat")
    with pytest.raises(ValueError, match="discrete Gaussian"):
        AncestralSampler(SigmaProcess(), variance_type="analytic", gamma=gamma)
    with pytest.raises(ValueError, match="no reverse variance"):
        EulerSampler(diffusion, variance_type="analytic", steps=5)
    with pytest.raises(ValueError, match="analytic_clip_pixels"):
        AncestralSampler(diffusion, variance_type="analytic", gamma=gamma, analytic_clip_pixels=0)


def test_training_refuses_analytic():
    from tests.conftest import tiny_diffusion_module

    with pytest.raises(ValueError, match="model.variance_type=analytic"):
        tiny_diffusion_module(num_timesteps=10, variance_type="analytic")


def test_weights_mismatch_is_an_error(tmp_path):
    from tests.conftest import tiny_diffusion_module

    module = tiny_diffusion_module(num_timesteps=10)
    gamma = torch.full((10,), 0.5, dtype=torch.float64)
    path = write_gamma(tmp_path / "g.safetensors", gamma, gamma * 0, {"weights_sha256": "0" * 64, "ckpt": "other"})
    module.sampler = AncestralSampler(module.diffusion, variance_type="analytic", gamma=str(path), steps=5)
    with pytest.raises(ValueError, match="other weights"):
        verify_gamma_weights(module, "ckpt='x'")


def test_other_variances_unchanged_by_a_gamma():
    diffusion = GaussianDiffusion(num_timesteps=50)
    gamma = torch.full((50,), 0.5, dtype=torch.float64)
    for variance in ("fixed_small", "fixed_large"):
        plain = AncestralSampler(diffusion, variance_type=variance, steps=9)
        given = AncestralSampler(diffusion, variance_type=variance, steps=9, gamma=gamma)
        assert plain._table.keys() == given._table.keys()
        assert all(torch.equal(plain._table[k], given._table[k]) for k in plain._table)
    plain, given = DDIMSampler(diffusion, steps=9, eta=0.3), DDIMSampler(diffusion, steps=9, eta=0.3, gamma=gamma)
    assert all(torch.equal(plain._table[k], given._table[k]) for k in plain._table)

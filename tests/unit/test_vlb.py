"""Improved DDPM math: Gaussian KL, the discretised decoder, bits/dim, VLB terms, hybrid weighting, stop-gradient."""

import math

import pytest
import torch

from difflab.losses import DiffusionLoss, discretized_gaussian_log_likelihood, normal_kl, prior_bpd, vlb_term
from difflab.losses.vlb import bits_per_dim
from difflab.schedules import GaussianDiffusion, Parameterization, VarianceType

EPS, LEARNED = Parameterization.EPS, VarianceType.LEARNED_RANGE


def test_normal_kl_against_numerical_integration():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.4, math.log(1.7)
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)

    def logpdf(m, lv):
        return -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / math.exp(lv))

    integrand = torch.exp(logpdf(m1, lv1)) * (logpdf(m1, lv1) - logpdf(m2, lv2))
    numeric = torch.trapezoid(integrand, x).item()
    closed = normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, lv1, m2, lv2))).item()
    assert closed == pytest.approx(numeric, rel=1e-7)
    assert normal_kl(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1)).item() == 0.0


def test_discretized_decoder_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in ((0.1, math.log(0.05)), (-0.9, math.log(0.3)), (0.0, math.log(2.0))):
        logp = discretized_gaussian_log_likelihood(bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_discretized_decoder_interior_bin_closed_form():
    x, mean, scale = torch.tensor([0.2], dtype=torch.float64), 0.25, 0.1

    def cdf(v):
        return 0.5 * (1 + math.erf(v / math.sqrt(2)))

    expected = math.log(cdf((0.2 + 1 / 255 - mean) / scale) - cdf((0.2 - 1 / 255 - mean) / scale))
    got = discretized_gaussian_log_likelihood(x, torch.tensor([mean]), torch.tensor([math.log(scale)]))
    assert got.item() == pytest.approx(expected, rel=1e-9)


def test_bits_per_dim_conversion():
    nats = torch.full((2, 3, 4, 4), math.log(2.0) * 5)
    torch.testing.assert_close(bits_per_dim(nats), torch.full((2,), 5.0))


def test_prior_term_is_tiny_for_ddpm_linear():
    diffusion = GaussianDiffusion(num_timesteps=1000)
    prior = prior_bpd(diffusion, torch.rand(4, 1, 8, 8) * 2 - 1)
    assert 0 < prior.max().item() < 1e-4  # Ho et al. §4: L_T ≈ 1e-5 bits/dim


def model_output_like(x, requires_grad=False):
    torch.manual_seed(1)
    out = torch.cat([torch.randn_like(x) * 0.5, torch.rand_like(x) * 2 - 1], dim=1)
    return out.requires_grad_(requires_grad)


def test_vlb_term_is_kl_for_t_gt_0_and_decoder_nll_at_0():
    diffusion = GaussianDiffusion(num_timesteps=50)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    t = torch.tensor([0, 30])
    xt = diffusion.q_sample(x0, t, torch.randn_like(x0))
    out = model_output_like(x0)
    terms = vlb_term(diffusion, EPS, LEARNED, out, x0, xt, t)
    p = diffusion.p_mean_variance(EPS, LEARNED, out, xt, t)
    mean_q, _, logvar_q = diffusion.q_posterior_mean_variance(x0, xt, t)
    kl = bits_per_dim(normal_kl(mean_q, logvar_q, p["mean"], p["log_variance"]))
    nll = -bits_per_dim(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]))
    assert terms[1].item() == pytest.approx(kl[1].item(), rel=1e-6)
    assert terms[0].item() == pytest.approx(nll[0].item(), rel=1e-6)


@pytest.mark.parametrize("num_timesteps", [1000, 4000])
def test_hybrid_weight_is_lambda_times_T(num_timesteps):
    """λ = 0.001 applies to the VLB summed over T: the per-example term is weighted λ·T (= 1 at T = 1000)."""
    diffusion = GaussianDiffusion(num_timesteps=num_timesteps)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([1, 500, 999])
    xt = diffusion.q_sample(x0, t, noise)
    out = model_output_like(x0)
    terms = DiffusionLoss("hybrid", vlb_weight=0.001)(diffusion, EPS, LEARNED, out, x0, xt, noise, t)
    # both halves computed here independently of DiffusionLoss: the ε MSE and the VLB term of each example
    mse = ((out[:, :1] - noise) ** 2).flatten(1).mean(1)
    vb = vlb_term(diffusion, EPS, LEARNED, out, x0, xt, t)
    assert vb.min() > 1e-3  # so that a wrong weight shows in the sum
    torch.testing.assert_close(terms["loss"], mse + (num_timesteps / 1000) * vb, rtol=1e-5, atol=1e-6)


def test_vlb_term_of_hybrid_trains_only_the_variance():
    diffusion = GaussianDiffusion(num_timesteps=100)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([3, 60])
    xt = diffusion.q_sample(x0, t, noise)
    out = model_output_like(x0, requires_grad=True)
    DiffusionLoss("hybrid")(diffusion, EPS, LEARNED, out, x0, xt, noise, t)["vb"].sum().backward()
    mean_grad, var_grad = out.grad.chunk(2, dim=1)
    assert torch.count_nonzero(mean_grad) == 0
    assert torch.count_nonzero(var_grad) > 0
    out.grad = None
    DiffusionLoss("vlb")(diffusion, EPS, LEARNED, out, x0, xt, noise, t)["vb"].sum().backward()
    assert torch.count_nonzero(out.grad.chunk(2, dim=1)[0]) > 0  # plain L_vlb trains the mean too


def test_loss_and_variance_combinations_are_checked():
    with pytest.raises(ValueError, match="model.loss.loss_type=hybrid or vlb"):
        DiffusionLoss("simple").check(LEARNED)
    with pytest.raises(ValueError, match="needs model.variance_type=learned_range"):
        DiffusionLoss("hybrid").check(VarianceType.FIXED_SMALL)
    with pytest.raises(ValueError, match="model.loss.loss_type"):
        DiffusionLoss("kl")


def test_vlb_math_stays_fp32_under_bf16_output():
    diffusion = GaussianDiffusion(num_timesteps=100)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    t = torch.tensor([0, 50])
    xt = diffusion.q_sample(x0, t, torch.randn_like(x0))
    terms = vlb_term(diffusion, EPS, LEARNED, model_output_like(x0).bfloat16(), x0, xt, t)
    assert terms.dtype == torch.float32 and torch.isfinite(terms).all()

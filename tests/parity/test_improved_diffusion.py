"""Parity with improved-diffusion (Nichol & Dhariwal's code, openai/improved-diffusion at 1bc7bbb; not a pip
package), by pinned values.

How the values were obtained: improved-diffusion's ``gaussian_diffusion.py``, ``respace.py`` and ``losses.py`` run
unchanged (torch 2.14, CPU, float32 tensors as they use them) on the inputs built below from
``tests/parity/analytic.py``: ``GaussianDiffusion(betas=get_named_beta_schedule("cosine", 1000),
model_mean_type=EPSILON, model_var_type=LEARNED_RANGE, loss_type=RESCALED_MSE)`` and

- ``X_T = q_sample(x_0, t, noise)``, ``p_mean_variance(model, X_T, t, clip_denoised=False)``;
- ``_vb_terms_bpd(model, x_0, X_T, t, clip_denoised=False)["output"]``;
- ``training_losses(model, x_0, t, noise=noise)`` and the gradient of ``loss.sum()`` w.r.t. the model output;
- ``SpacedDiffusion(space_timesteps(1000, "10"), ...).p_mean_variance`` at every respaced index, v = +1 and −1;
- ``calc_bpd_loop(model, x_0, clip_denoised=False)`` on the T = 20 cosine schedule after ``torch.manual_seed(0)``
  (its ``randn_like`` draws for t = T−1 … 0 are the stream a Generator seeded 0 gives difflab's ``full_chain_bpd``).

improved-diffusion's decoder L_0 uses a tanh approximation of Φ; the tests that involve L_0 give difflab the same
(``approx_standard_normal_cdf``, kept for this) so that every other formula is compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from difflab.losses import DiffusionLoss, vlb
from difflab.losses.nll import full_chain_bpd
from difflab.samplers import AncestralSampler, spaced_timesteps
from difflab.schedules import GaussianDiffusion, Parameterization, VarianceType
from tests.parity.analytic import AnalyticModel, pattern, quantized_image, with_range_ends


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split()]


EPS, LEARNED = Parameterization.EPS, VarianceType.LEARNED_RANGE
SHAPE = (4, 1, 2, 2)
T_BATCH = torch.tensor([0, 1, 500, 999])  # index 0 is the paper's t = 1: the decoder term and the range's low end

X_T = floats(
    """
    -1.0069417 0.9920786 -0.96715665 -0.84205002 -0.21658322 0.52910018 0.96381921 0.84243602 1.0658753
    0.30832264 -1.1304559 -1.5836684 -0.36478871 1.1533461 1.1693677 -0.33757639
    """
)
PMV_MEAN = floats(
    """
    -1.0065918 0.99177325 -0.96666175 -0.84113687 -0.21589582 0.52808332 0.96347463 0.8417865 1.063275
    0.30832008 -1.1255248 -1.577183 -0.011345554 0.036839854 0.037331298 -0.010471343
    """
)
# per example: pixel 0 has v = +1 (log β_t; at t = 0 log β_0 = −10.095, not log β̃_1 = −10.734), pixel 1 v = −1
PMV_LOG_VARIANCE = floats(
    """
    -10.09503 -10.734082 -10.701821 -10.693235 -9.9837923 -10.734082 -10.196123 -10.234936 -5.7585478 -5.761622
    -5.7613316 -5.7614975 -0.0010005003 -0.0010029267 -0.0010005836 -0.0010015194
    """
)
VB_TERMS = floats("1.6664914 0.63315421 0.002312707 5.2199954e-07")
HYBRID_LOSS = floats("2.949558 1.6351109 0.51488858 5.2275288e-07")
HYBRID_MSE = floats("1.2830666 1.0019566 0.51257586 7.5333806e-10")
HYBRID_GRAD_VAR = floats(
    """
    0.010428309 -0.077634811 0.039660871 -0.11580431 0.0079166442 -0.087899804 -0.061244428 0.024624765
    6.594928e-07 -1.3022218e-06 -1.3154931e-06 -6.2945765e-07 4.8812343e-13 -5.4234395e-14 1.9886176e-13
    5.4234395e-14
    """
)
HYBRID_GRAD_MEAN = floats(
    """
    0.51295149 0.64017165 -0.15296505 -0.76598263 -0.44108212 0.53908741 0.71141827 0.10330499 -0.16634524
    -0.43333468 -0.4487353 -0.30945563 -7.5548887e-06 8.1658363e-06 1.8656254e-05 1.6778708e-05
    """
)
# respaced "10" (= difflab's even spacing): (index, v = +1), (index, v = −1) for index 0..9
SPACED_TIMESTEPS = [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
SPACED_LOG_VARIANCE = floats(
    """
    -10.09503 -10.096189 -3.3704782 -10.096189 -2.3781526 -3.6595457 -1.8769838 -2.6102118 -1.5171359 -2.0061634
    -1.2134906 -1.5564188 -0.92700905 -1.1673875 -0.63013035 -0.79032665 -0.29790998 -0.39000195 -8.1976509e-08
    -0.03007544
    """
)
# full chain on T = 20: improved-diffusion's vb columns run t = T−1 … 0 (difflab's ``vb`` is indexed by t)
RANDN_GUARD = floats("1.5409961 -0.2934289 -2.1787894 0.56843126")
CHAIN_TOTAL_BPD = floats("10.371951 11.154754")
CHAIN_PRIOR_BPD = floats("3.350008e-06 2.3221835e-06")
CHAIN_VB = floats(
    """
    0.0038035696 0.0118835 0.017384835 0.026417252 0.034895778 0.036510389 0.058626648 0.061973527 0.10735239
    0.076793328 0.14106946 0.19771568 0.19567277 0.25479841 0.25172371 0.34022114 0.51189113 1.048403 2.2260766
    4.7687354 0.0029608211 0.0084896181 0.01935539 0.02192973 0.027630694 0.031217786 0.048343357 0.076505519
    0.06812039 0.090881974 0.0782566 0.13407925 0.18289888 0.21261483 0.098982617 0.86511445 0.38564524
    1.0376631 2.8029509 4.9611106
    """
)


def pinned(values: list[float], shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def close(got: torch.Tensor, values: list[float], shape: tuple[int, ...] = SHAPE, atol: float = 1e-6) -> None:
    torch.testing.assert_close(got.detach().float(), pinned(values, shape), rtol=1e-5, atol=atol)


@pytest.fixture
def improved_diffusion_cdf(monkeypatch):
    """improved-diffusion's tanh approximation of Φ in the discretised decoder (see the module docstring)."""
    monkeypatch.setattr(vlb, "standard_normal_cdf", vlb.approx_standard_normal_cdf)


@pytest.fixture(scope="module")
def inputs():
    diffusion = GaussianDiffusion("cosine", 1000)
    x_start, noise = quantized_image(SHAPE, seed=3), pattern(SHAPE, seed=4)
    x_t = diffusion.q_sample(x_start, T_BATCH, noise)
    out = with_range_ends(AnalyticModel(diffusion.alphas_cumprod_64, "eps", learned_variance=True)(x_t, T_BATCH))
    return diffusion, x_start, noise, x_t, out


def test_q_sample_and_learned_range_p_mean_variance(inputs):
    """Including t = 0, where v = +1 must give log β_0 (the unclipped β; the fixed_large array has β̃_1 there)."""
    diffusion, _, _, x_t, out = inputs
    close(x_t, X_T)
    p = diffusion.p_mean_variance(EPS, LEARNED, out, x_t, T_BATCH)
    close(p["mean"], PMV_MEAN)
    close(p["log_variance"], PMV_LOG_VARIANCE)


def test_vlb_terms_in_bits_per_dim(inputs, improved_diffusion_cdf):
    """L_0 (the decoder) at t = 0, KL terms at t > 0."""
    diffusion, x_start, _, x_t, out = inputs
    close(vlb.vlb_term(diffusion, EPS, LEARNED, out, x_start, x_t, T_BATCH), VB_TERMS, (4,))


def test_hybrid_loss_and_its_gradient(inputs, improved_diffusion_cdf):
    """L_simple + λ·T·L_t with the stop-gradient on the mean (improved-diffusion's RESCALED_MSE): the loss, and the
    gradient of both halves of the output, including the variance channels at t = 0 (zero if the variance were
    ignored there)."""
    diffusion, x_start, noise, x_t, out = inputs
    out = out.clone().requires_grad_(True)
    terms = DiffusionLoss("hybrid", vlb_weight=0.001)(diffusion, EPS, LEARNED, out, x_start, x_t, noise, T_BATCH)
    terms["loss"].sum().backward()
    close(terms["loss"], HYBRID_LOSS, (4,))
    close(terms["mse"], HYBRID_MSE, (4,))
    close(terms["vb"], VB_TERMS, (4,))
    close(out.grad[:, 1:], HYBRID_GRAD_VAR, atol=1e-8)
    close(out.grad[:, :1], HYBRID_GRAD_MEAN, atol=1e-8)
    assert out.grad[0, 1:].abs().min() > 1e-3  # the t = 0 variance gets a gradient


def test_respaced_learned_range_variance_at_every_step():
    """AncestralSampler's respaced learned range = SpacedDiffusion's, at the first kept step too."""
    diffusion = GaussianDiffusion("cosine", 1000)
    assert spaced_timesteps(1000, 10, "even").tolist() == SPACED_TIMESTEPS
    sampler = AncestralSampler(diffusion, model_variance_type="learned_range", steps=10, spacing="even")
    ends = torch.tensor([1.0, -1.0]).reshape(1, 1, 2)
    got = torch.stack([sampler.log_variance(i, ends) for i in range(10)])
    close(got, SPACED_LOG_VARIANCE, (10, 1, 1, 2))


def test_full_chain_bits_per_dim(improved_diffusion_cdf):
    torch.testing.assert_close(torch.randn(4, generator=torch.Generator().manual_seed(0)), pinned(RANDN_GUARD, (4,)))
    diffusion = GaussianDiffusion("cosine", 20)
    model = AnalyticModel(diffusion.alphas_cumprod_64, "eps", learned_variance=True)
    x_start = quantized_image((2, 1, 2, 2), seed=5)
    result = full_chain_bpd(model, diffusion, EPS, LEARNED, x_start, generator=torch.Generator().manual_seed(0))
    close(result["vb"].flip(1), CHAIN_VB, (2, 20), atol=1e-5)
    close(result["prior_bpd"], CHAIN_PRIOR_BPD, (2,), atol=1e-9)
    close(result["total_bpd"], CHAIN_TOTAL_BPD, (2,), atol=1e-5)


def test_spacings_match_space_timesteps():
    """``ddim_uniform`` = ``space_timesteps(T, "ddimK")`` (the smallest stride giving exactly K steps; none for K = 37);
    ``even`` = ``space_timesteps(T, [K])``, including its ties at x.5 (K = 21, 27: index 499, not 500); ``leading``
    is diffusers' (stride T // K), which differs from ddimK when K does not divide T."""
    assert spaced_timesteps(1000, 7, "ddim_uniform").tolist() == [0, 143, 286, 429, 572, 715, 858]
    assert spaced_timesteps(1000, 7, "leading").tolist() == [0, 142, 284, 426, 568, 710, 852]
    assert spaced_timesteps(1000, 50, "ddim_uniform").tolist() == spaced_timesteps(1000, 50, "leading").tolist()
    with pytest.raises(ValueError, match="sampler.spacing=ddim_uniform"):
        spaced_timesteps(1000, 37, "ddim_uniform")
    assert spaced_timesteps(1000, 21, "even").tolist()[9:12] == [450, 499, 549]
    assert spaced_timesteps(1000, 27, "even").tolist()[12:15] == [461, 499, 538]
    # the one documented difference: one step starts from pure noise at t = T (improved-diffusion's "1" gives [0])
    assert spaced_timesteps(1000, 1, "even").tolist() == [999]

"""Respacing (Nichol & Dhariwal §4): the kept steps keep their ᾱ; K = T is the original chain."""

import torch

from difflab.samplers import AncestralSampler
from difflab.schedules import GaussianDiffusion, Parameterization, VarianceType


def test_alphas_cumprod_at_kept_steps_are_the_originals():
    """The sampler's respaced β (its fixed_large/learned-range upper end) compound back to the original ᾱ at the
    kept steps, and its posterior coefficients are those of that respaced chain (Ho et al. eq. 7)."""
    diffusion = GaussianDiffusion("cosine", 1000)
    sampler = AncestralSampler(diffusion, model_variance_type="learned_range", steps=50)
    table = {k: v.double() for k, v in sampler._table.items()}
    betas = table["log_betas"].exp()  # β_{t|s} = 1 − ᾱ_t/ᾱ_s, as the sampler derived them
    ab = diffusion.alphas_cumprod_64[sampler.timesteps.flip(0)]  # the original ᾱ at the kept steps
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), ab, rtol=1e-5, atol=1e-9)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    torch.testing.assert_close(table["coef_x0"], ab_prev.sqrt() * betas / (1 - ab), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(table["coef_xt"], (1 - betas).sqrt() * (1 - ab_prev) / (1 - ab), rtol=1e-5, atol=1e-7)
    small = betas[1:] * (1 - ab_prev[1:]) / (1 - ab[1:])  # β̃ of each jump (the first is clipped)
    torch.testing.assert_close(table["log_variance_small"][1:].exp(), small, rtol=1e-5, atol=1e-12)
    kept = sampler.timesteps.flip(0)
    assert (betas[1:] > diffusion.betas.double()[kept[1:]]).all()  # jumps of ~20 steps, not the original β_t


def test_full_length_sampler_equals_p_mean_variance_of_the_process():
    """The sampler's step at K = T has exactly the mean and variance of p_θ(x_{t−1}|x_t) in GaussianDiffusion."""
    diffusion = GaussianDiffusion("linear", 100)
    sampler = AncestralSampler(
        diffusion, Parameterization.V, model_variance_type=VarianceType.LEARNED_RANGE, clip_denoised=False
    )
    torch.manual_seed(0)
    x_t = torch.randn(3, 2, 4, 4)
    out = torch.cat([torch.randn_like(x_t), torch.rand_like(x_t) * 2 - 1], dim=1)
    for t in (1, 50, 99):
        t_batch = torch.full((3,), t)
        p = diffusion.p_mean_variance(Parameterization.V, VarianceType.LEARNED_RANGE, out, x_t, t_batch)
        gen_a, gen_b = torch.Generator().manual_seed(t), torch.Generator().manual_seed(t)
        step = sampler.step(out, t, x_t, generator=gen_a).prev_sample
        expected = p["mean"] + torch.exp(0.5 * p["log_variance"]) * torch.randn(x_t.shape, generator=gen_b)
        torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)

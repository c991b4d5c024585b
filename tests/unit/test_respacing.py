"""Respacing (Nichol & Dhariwal §4): the kept steps keep their ᾱ; K = T is the original chain."""

import torch

from difflab.samplers import AncestralSampler
from difflab.schedules import GaussianDiffusion, Parameterization, VarianceType


def test_alphas_cumprod_at_kept_steps_are_the_originals():
    diffusion = GaussianDiffusion("cosine", 1000)
    sampler = AncestralSampler(diffusion, model_variance_type="learned_range", steps=50)
    kept = sampler.timesteps.flip(0)
    ab = diffusion.alphas_cumprod_64[kept]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    betas = 1 - ab / ab_prev  # β recomputed from ᾱ at the kept steps
    torch.testing.assert_close(torch.cumprod(1 - betas, 0), ab)


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

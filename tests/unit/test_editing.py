"""Inpainting (replacement + RePaint) and image-to-image over the sampler contract, with analytic ε-oracles."""

from __future__ import annotations

import pytest
import torch

from difflab.samplers import AncestralSampler, DDIMSampler, DPMSolverMultistepSampler, sample_loop
from difflab.samplers.img2img import img2img_loop, strength_steps
from difflab.samplers.inpaint import inpaint_loop, repaint_schedule
from difflab.schedules import GaussianDiffusion
from difflab.tasks.editing import latent_mask

RHO = 0.9  # correlation of the two-pixel Gaussian data
CONDITIONAL_MEAN, CONDITIONAL_VAR = RHO * 1.0, 1 - RHO**2  # of pixel 1 given pixel 0 = 1


def two_pixel_oracle(diffusion: GaussianDiffusion, rho: float = RHO):
    """E[ε | x_t] for x_0 ~ N(0, Σ), Σ = [[1, ρ], [ρ, 1]] over the two pixels of a (B, 1, 1, 2) image:
    x_t ~ N(0, ᾱΣ + (1 − ᾱ)I) and E[ε | x_t] = sqrt(1 − ᾱ) (ᾱΣ + (1 − ᾱ)I)^{-1} x_t."""
    sigma = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)

    def model_fn(x, t):
        ab = diffusion.extract(diffusion.alphas_cumprod, t, x).double().reshape(-1, 1, 1)
        cov = ab * sigma + (1 - ab) * torch.eye(2, dtype=torch.float64)
        eps = (1 - ab[:, 0]).sqrt() * torch.linalg.solve(cov, x.double().reshape(-1, 2, 1)).squeeze(-1)
        return eps.float().reshape(x.shape)

    return model_fn


def inpaint_pixel(rho: float, jump_length: int = 1, jump_n_sample: int = 1, sampler_cls=AncestralSampler, n=20000):
    """Pixel 0 known (= 1), pixel 1 filled, T = 100: returns (x_0 (n, 1, 1, 2), the sampler)."""
    diffusion = GaussianDiffusion(num_timesteps=100)
    sampler = sampler_cls(diffusion, clip_denoised=False)
    ref = torch.zeros(n, 1, 1, 2)
    ref[..., 0] = 1.0
    known = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    g = torch.Generator().manual_seed(0)
    x = inpaint_loop(two_pixel_oracle(diffusion, rho), sampler, ref, known, g, None, jump_length, jump_n_sample)
    return x, sampler


def test_repaint_schedule_matches_the_authors():
    """Pinned from RePaint's guided_diffusion/scheduler.py (github.com/andreas128/RePaint): the lists printed by
    ``get_schedule_jump(t_T, n_sample=1, jump_length, jump_n_sample)`` (second and third jumps at their default 1,
    which is ``get_schedule_jump_paper`` for t_T=250, j=10, r=10) for these small t_T."""
    assert repaint_schedule(5, 2, 2) == [4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    assert repaint_schedule(6, 2, 3) == [5, 4, 3, 2, 3, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1, 0, -1]
    assert repaint_schedule(10, 3, 2) == [
        9, 8, 7, 6, 7, 8, 9, 8, 7, 6, 5, 4, 3, 4, 5, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 2, 1, 0, -1
    ]  # fmt: skip
    assert repaint_schedule(4) == [3, 2, 1, 0, -1]  # r = 1: the plain chain


def test_repaint_schedule_shape_for_the_paper_setting():
    """t_T = 250, j = 10, r = 10 (the paper): unit steps, jumps at 0, 10, …, 230 → 250 + 24·9·10 denoising steps."""
    times = repaint_schedule(250, 10, 10)
    diffs = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    assert set(diffs) == {-1, 1} and times[0] == 249 and times[-1] == -1
    assert diffs.count(-1) == 250 + 24 * 9 * 10 and diffs.count(1) == 24 * 9 * 10
    with pytest.raises(ValueError, match="resample_times"):
        repaint_schedule(10, 2, 0)


def test_inpainting_keeps_the_known_region_exactly_and_fills_from_the_oracle():
    """Independent pixels (ρ = 0): the known pixel is exactly the reference at t = 0, the filled one follows the
    data distribution N(0, 1), whatever the reference."""
    x, sampler = inpaint_pixel(rho=0.0)
    assert torch.equal(x[..., 0], torch.ones_like(x[..., 0]))
    assert x[..., 1].mean().item() == pytest.approx(0.0, abs=0.03)
    assert x[..., 1].var().item() == pytest.approx(1.0, rel=0.05)
    assert sampler.nfe == 100


def test_repaint_resampling_reaches_the_conditional_where_replacement_does_not():
    """Correlated pixels (ρ = 0.9): p(x_1 | x_0 = 1) = N(0.9, 0.19). Plain replacement is biased toward the marginal
    (mean ≈ 0.59: the known pixel's information reaches x_1 only through noisy replacements); RePaint's resampling
    (j = 10, r = 10) harmonises the two and lands near the conditional."""
    plain, _ = inpaint_pixel(rho=RHO)
    repaint, sampler = inpaint_pixel(rho=RHO, jump_length=10, jump_n_sample=10)
    assert torch.equal(repaint[..., 0], torch.ones_like(repaint[..., 0]))
    assert abs(plain[..., 1].mean().item() - CONDITIONAL_MEAN) > 0.2
    assert repaint[..., 1].mean().item() == pytest.approx(CONDITIONAL_MEAN, abs=0.05)
    assert repaint[..., 1].var().item() == pytest.approx(CONDITIONAL_VAR, rel=0.15)
    assert sampler.nfe == 100 + 9 * 9 * 10  # jumps at 0, 10, …, 80


def test_inpainting_with_ddim_and_the_refused_solvers():
    x, _ = inpaint_pixel(rho=RHO, sampler_cls=DDIMSampler, n=64)
    assert torch.equal(x[..., 0], torch.ones_like(x[..., 0]))
    with pytest.raises(ValueError, match="sampler=ddpm"):
        inpaint_pixel(rho=RHO, sampler_cls=DPMSolverMultistepSampler, n=4)


def img2img_setup(sampler_cls=AncestralSampler, steps=20):
    diffusion = GaussianDiffusion(num_timesteps=100)
    return two_pixel_oracle(diffusion), sampler_cls(diffusion, clip_denoised=False, steps=steps)


def test_img2img_strength_zero_returns_the_input_and_one_is_unconditional_sampling():
    model_fn, sampler = img2img_setup()
    x_ref = torch.randn(16, 1, 1, 2, generator=torch.Generator().manual_seed(5))
    same = img2img_loop(model_fn, sampler, x_ref, 0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(same, x_ref) and sampler.nfe == 0
    edited = img2img_loop(model_fn, sampler, x_ref, 1.0, generator=torch.Generator().manual_seed(1))
    generated = sample_loop(model_fn, sampler, x_ref.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(edited, generated, rtol=0, atol=0)


def test_img2img_runs_the_steps_below_s_times_t():
    """s = 0.5 of T = 100 with 20 even steps: the steps τ with τ + 1 <= 50, from t_s = τ_max; the result moves less
    from the input than at s = 0.9."""
    model_fn, sampler = img2img_setup()
    steps = strength_steps(sampler, 0.5)
    assert int(steps.max()) + 1 <= 50 and int(steps.min()) == 0
    assert steps.tolist() == [t for t in sampler.timesteps.tolist() if t < 50]
    x_ref = torch.full((4000, 1, 1, 2), 1.5)
    near = img2img_loop(model_fn, sampler, x_ref, 0.2, generator=torch.Generator().manual_seed(0))
    assert sampler.nfe == len(strength_steps(sampler, 0.2))
    far = img2img_loop(model_fn, sampler, x_ref, 0.9, generator=torch.Generator().manual_seed(0))
    assert (near - x_ref).abs().mean() < (far - x_ref).abs().mean()


def test_img2img_from_ddim_inversion_reconstructs_the_input():
    """start=invert with DDIM η = 0 at strength 1: encode then decode, the identity up to discretisation error."""
    model_fn, sampler = img2img_setup(DDIMSampler, steps=100)
    x_ref = torch.tensor([0.8, 0.5]).reshape(1, 1, 1, 2).repeat(4, 1, 1, 1)
    out = img2img_loop(model_fn, sampler, x_ref, 1.0, start="invert")
    torch.testing.assert_close(out, x_ref, atol=0.02, rtol=0)
    half = img2img_loop(model_fn, sampler, x_ref, 0.4, start="invert")
    torch.testing.assert_close(half, x_ref, atol=0.01, rtol=0)


def test_img2img_errors():
    model_fn, sampler = img2img_setup()
    x_ref = torch.zeros(2, 1, 1, 2)
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ValueError, match="strength"):
            img2img_loop(model_fn, sampler, x_ref, bad)
    with pytest.raises(ValueError, match="sampler=ddim"):
        img2img_loop(model_fn, sampler, x_ref, 0.5, start="invert")
    with pytest.raises(ValueError, match="start"):
        img2img_loop(model_fn, sampler, x_ref, 0.5, start="magic")


def test_latent_mask_keeps_only_wholly_known_cells():
    known = torch.ones(1, 1, 8, 8)
    known[..., 3:5, 3:5] = 0  # a 2x2 hole at the centre: at f = 4 it touches all four cells
    assert latent_mask(known, (1, 3, 2, 2)).sum() == 0
    assert latent_mask(known, (1, 3, 4, 4)).sum() == 12  # f = 2: the hole touches 4 of 16 cells
    assert torch.equal(latent_mask(known, (1, 1, 8, 8)), known)

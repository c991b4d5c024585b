"""PLMS / PNDM (Liu et al. 2022) against diffusers' ``PNDMScheduler``: the same analytic ε-model, the same x_T, every
evaluation fed the reference's x (with and without ``skip_prk_steps``), the timesteps (evaluation plan) equal, and
on a v-model the PNDM paper's combination of ε's, which diffusers combines as raw v (equal for ε-models only)."""

from __future__ import annotations

import pytest
from diffusers import PNDMScheduler

from difflab.samplers import DDIMSampler, PNDMSampler
from tests.parity.analytic import AnalyticModel, pattern
from tests.parity.test_diffusers import SHAPE, assert_step_close, make_diffusion, reference


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prk", [False, True], ids=["plms", "pndm"])
@pytest.mark.parametrize("steps", [10, 25])
def test_plms_and_pndm_match_pndm_scheduler(schedule, prk, steps):
    diffusion = make_diffusion(schedule)
    sampler = PNDMSampler(diffusion, "eps", steps=steps, prk_steps=prk, spacing="leading", clip_denoised=False)
    # set_alpha_to_one: after the last level comes ᾱ = 1, as DDIM's (diffusers' PNDM default is ᾱ_0)
    sched = reference(PNDMScheduler, diffusion, skip_prk_steps=not prk, set_alpha_to_one=True, steps_offset=0)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == sampler.timesteps.tolist()
    assert len(sampler.timesteps) == sampler.num_evaluations() == steps + (9 if prk else 1)
    model = AnalyticModel(diffusion.alphas_cumprod_64, "eps")
    x = pattern(SHAPE, seed=1)
    ab = diffusion.alphas_cumprod_64
    for t in sampler.timesteps.tolist():
        out = model(x, t)
        ours = sampler.step(out, t, x).prev_sample
        x = sched.step(out, t, x).prev_sample.float()
        assert_step_close(ours, x, t, (1.0 / ab[t]).sqrt().item() ** 0.5)


def test_the_first_plms_step_is_ddim():
    """Before there is a history, PLMS's step is DDIM's (η = 0), in any parameterisation, clipped or not (float32:
    x̂_0 is recomputed from ε through 1/sqrt(ᾱ_t), the step's condition number)."""
    diffusion = make_diffusion("cosine")
    for parameterization, clip in (("v", True), ("x0", False), ("eps", True)):
        model = AnalyticModel(diffusion.alphas_cumprod_64, parameterization)
        x = pattern(SHAPE, seed=2)
        plms = PNDMSampler(diffusion, parameterization, steps=10, clip_denoised=clip, spacing="trailing")
        ddim = DDIMSampler(diffusion, parameterization, steps=10, clip_denoised=clip, spacing="trailing")
        t = int(plms.timesteps[0])
        ours, ref = plms.step(model(x, t), t, x).prev_sample, ddim.step(model(x, t), t, x).prev_sample
        assert_step_close(ours, ref, t, (1.0 / diffusion.alphas_cumprod_64[t]).sqrt().item())


def test_pndm_needs_four_steps_and_the_plan_order():
    diffusion = make_diffusion("linear")
    with pytest.raises(ValueError, match="sampler.steps=3: PNDM's Runge–Kutta warm start needs steps >= 4"):
        PNDMSampler(diffusion, "eps", steps=3, prk_steps=True)
    sampler = PNDMSampler(diffusion, "eps", steps=10, spacing="leading")
    x = pattern(SHAPE, seed=1)
    with pytest.raises(ValueError, match="timestep 800: PNDM expected 900"):
        sampler.step(x, 800, x)


def test_plms_from_t_equals_T_on_the_cosine_schedule_stays_on_the_data():
    """From t = T of the cosine schedule (ᾱ ≈ 2e-9) the combined ε of PLMS's averaged first step is not the model's
    at x, and its x̂_0 = (x − sqrt(1 − ᾱ) ε)/sqrt(ᾱ) carries that difference times 1/sqrt(ᾱ) ≈ 2e4: thresholded as
    DDIM's (clip_denoised), a 20-step PLMS chain ends near a 200-step DDIM chain from the same x_T (it diverged
    before the transfer clipped x̂_0: samples far outside [-1, 1])."""
    diffusion = make_diffusion("cosine")
    model = AnalyticModel(diffusion.alphas_cumprod_64, "eps")
    x_T = pattern(SHAPE, seed=3)

    def run(sampler):
        x = x_T.clone()
        for t in sampler.timesteps:
            x = sampler.step(model(x, int(t)), int(t), x).prev_sample
        return x

    plms = run(PNDMSampler(diffusion, "eps", steps=20, spacing="trailing"))
    ddim = run(DDIMSampler(diffusion, "eps", steps=200, spacing="trailing"))
    assert plms.abs().max() <= 1.0 + 1e-5
    assert (plms - ddim).abs().mean() < 0.05, (plms - ddim).abs().mean()

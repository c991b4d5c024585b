"""Parity with diffusers (0.42, the `dev` extra): the same analytic model output, the same x_t and the same noise
(generators with the same seed) through difflab's and diffusers' formulas, agreement to float32 tolerance.

The step tests install difflab's ᾱ (float64) in the diffusers scheduler, so they compare the step formulas; the
schedules themselves are compared with diffusers' own float32 ᾱ in the first tests. Each step of a whole respaced
chain starts from the same x_t (diffusers' previous output), so every step's formula is checked on its own.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

from difflab.samplers import AncestralSampler, DDIMSampler, spaced_timesteps
from difflab.schedules import GaussianDiffusion
from tests.parity.analytic import AnalyticModel, generator, pattern, quantized_image

PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
ENDPOINTS = {"scaled_linear": (0.00085, 0.012)}  # β_1, β_T: Stable Diffusion's for scaled_linear, else DDPM's
SHAPE = (2, 3, 8, 8)
T = 1000


def make_diffusion(schedule: str) -> GaussianDiffusion:
    beta_start, beta_end = ENDPOINTS.get(schedule, (1e-4, 0.02))
    return GaussianDiffusion(schedule, T, beta_start=beta_start, beta_end=beta_end)


def diffusers_scheduler(cls, schedule: str, **kwargs):
    """A diffusers scheduler of the same β schedule (its own float32 ᾱ)."""
    beta_start, beta_end = ENDPOINTS.get(schedule, (1e-4, 0.02))
    return cls(beta_schedule=SCHEDULE[schedule], beta_start=beta_start, beta_end=beta_end, **kwargs)


def reference(cls, diffusion: GaussianDiffusion, **kwargs):
    """A diffusers scheduler of the same schedule, with difflab's float64 ᾱ installed (see the module docstring)."""
    sched = diffusers_scheduler(cls, diffusion.beta_schedule.value, **kwargs)
    sched.alphas_cumprod = diffusion.alphas_cumprod_64.clone()
    return sched


def assert_step_close(ours: torch.Tensor, ref: torch.Tensor, t: int, condition: float = 1.0) -> None:
    """float32 agreement: atol scales with the output and with the step's condition number sqrt(ᾱ_prev/ᾱ_t)
    (x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε)/sqrt(ᾱ_t) multiplies the last bit of ε by 1/sqrt(ᾱ_t); the cosine schedule's
    first DDIM step, t = 999 → 949, has 1580)."""
    atol = 2e-5 * max(1.0, ref.abs().max().item()) * max(1.0, condition)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=atol, msg=lambda m: f"t={t}: {m}")


def run_chain(sampler, ref_step, model: AnalyticModel, seed: int = 0) -> torch.Tensor:
    """Run ``sampler`` and ``ref_step(out, t, x, generator)`` from the same x_T, feeding both the reference's x_t at
    every step; return the final x_0 of the reference."""
    x = pattern(SHAPE, seed=1)
    gen_ours, gen_ref = generator(seed), generator(seed)
    steps = sampler.timesteps.tolist()
    ab = sampler.diffusion.alphas_cumprod_64
    for t, prev in zip(steps, steps[1:] + [None], strict=True):
        out = model(x, t)
        ours = sampler.step(out, t, x, generator=gen_ours).prev_sample
        x = ref_step(out, t, x, gen_ref).float()
        assert_step_close(ours, x, t, ((1.0 if prev is None else ab[prev]) / ab[t]).sqrt().item())
    return x


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "cosine"])
def test_betas_and_alphas_cumprod_match_diffusers(schedule):
    diffusion = make_diffusion(schedule)
    sched = diffusers_scheduler(DDPMScheduler, schedule)
    torch.testing.assert_close(diffusion.betas, sched.betas, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(diffusion.alphas_cumprod, sched.alphas_cumprod, rtol=2e-5, atol=1e-9)  # f32 cumprod


def test_cosine_betas_match_betas_for_alpha_bar():
    ref = betas_for_alpha_bar(T, max_beta=0.999, alpha_transform_type="cosine").double()
    torch.testing.assert_close(make_diffusion("cosine").betas.double(), ref, rtol=1e-6, atol=0)
    assert ref.max().item() == pytest.approx(0.999)  # the clip is exercised


# ------------------------------------------------------------------------------------ forward process
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_add_noise_and_velocity_match_diffusers(schedule):
    diffusion = make_diffusion(schedule)
    sched = reference(DDPMScheduler, diffusion)
    x0, noise = quantized_image(SHAPE), pattern(SHAPE, seed=2)
    t = torch.tensor([0, 999])
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), sched.add_noise(x0, noise, t).float())
    torch.testing.assert_close(diffusion.velocity(x0, noise, t), sched.get_velocity(x0, noise, t).float())


# ------------------------------------------------------------------------------------------ DDPM step
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_chain_matches_diffusers(schedule, variance, parameterization, clip):
    """Ancestral sampling over 50 respaced steps (β of each jump recomputed from ᾱ) = DDPMScheduler with the same
    custom timesteps, for each variance, parameterisation and clipping."""
    diffusion = make_diffusion(schedule)
    learned = variance == "learned_range"
    sampler = AncestralSampler(
        diffusion,
        parameterization,
        model_variance_type=variance if learned else "fixed_small",
        variance_type=None if learned else variance,
        steps=50,
        clip_denoised=clip,
    )
    sched = reference(
        DDPMScheduler, diffusion, variance_type=variance, prediction_type=PREDICTION[parameterization], clip_sample=clip
    )
    sched.set_timesteps(timesteps=sampler.timesteps.tolist())
    model = AnalyticModel(diffusion.alphas_cumprod_64, parameterization, learned_variance=learned)
    run_chain(sampler, lambda out, t, x, g: sched.step(out, t, x, generator=g).prev_sample, model)


def test_dynamic_thresholding_matches_diffusers():
    """Imagen's dynamic thresholding (diffusers' ``thresholding=True`` with no upper bound on s)."""
    diffusion = make_diffusion("linear")
    sampler = AncestralSampler(diffusion, "x0", steps=50, dynamic_threshold=0.9)
    sched = reference(
        DDPMScheduler,
        diffusion,
        prediction_type="sample",
        thresholding=True,
        dynamic_thresholding_ratio=0.9,
        sample_max_value=math.inf,
    )
    sched.set_timesteps(timesteps=sampler.timesteps.tolist())
    analytic = AnalyticModel(diffusion.alphas_cumprod_64, "x0")

    def model(x, t):  # an over-saturated x̂_0 (as under a large guidance weight), so that s > 1 at every step
        return 3.0 * analytic(x, t)

    run_chain(sampler, lambda out, t, x, g: sched.step(out, t, x, generator=g).prev_sample, model)
    x0 = model(pattern(SHAPE, seed=1), 999)
    assert (sched._threshold_sample(x0) - x0.clamp(-1, 1)).abs().max() > 0.1  # not the static clip


# ------------------------------------------------------------------------------------------ DDIM step
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_chain_matches_diffusers(eta, parameterization, clip, spacing):
    """Eq. 12 with σ(η) of eq. 16 = DDIMScheduler.step(eta, use_clipped_model_output=True) on 20 steps."""
    diffusion = make_diffusion("cosine")
    sampler = DDIMSampler(diffusion, parameterization, steps=20, eta=eta, spacing=spacing, clip_denoised=clip)
    sched = reference(
        DDIMScheduler,
        diffusion,
        prediction_type=PREDICTION[parameterization],
        clip_sample=clip,
        timestep_spacing=spacing,
        set_alpha_to_one=True,
    )
    sched.set_timesteps(20)
    assert sched.timesteps.tolist() == sampler.timesteps.tolist()
    model = AnalyticModel(diffusion.alphas_cumprod_64, parameterization)

    def ref_step(out, t, x, g):
        return sched.step(out, t, x, eta=eta, use_clipped_model_output=True, generator=g).prev_sample

    run_chain(sampler, ref_step, model)


@pytest.mark.parametrize("spacing", ["ddim_uniform", "even"])
def test_ddim_sigma_hat_is_ddpm_with_the_larger_variance_on_tau(spacing):
    """The DDIM paper's σ̂ row (its code's ``ddpm_steps``): posterior mean of the jump plus σ̂ z, σ̂² = 1 − ᾱ_t/ᾱ_prev
    — DDPMScheduler with ``fixed_large`` on the same τ, the same x_t, ε̂ and z. Eq. 12 with σ̂ plugged in differs
    from it by up to 0.3 per step."""
    diffusion = make_diffusion("linear")
    sampler = DDIMSampler(diffusion, steps=50, sigma="hat", spacing=spacing, eta=0.0)
    sched = reference(DDPMScheduler, diffusion, variance_type="fixed_large", clip_sample=True)
    sched.set_timesteps(timesteps=sampler.timesteps.tolist())
    model = AnalyticModel(diffusion.alphas_cumprod_64, "eps")
    run_chain(sampler, lambda out, t, x, g: sched.step(out, t, x, generator=g).prev_sample, model)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_inversion_matches_ddim_inverse_scheduler(spacing):
    """``DDIMSampler.encode`` (η = 0 run forwards, ε evaluated at the lower level with the upper t) = the
    DDIMInverseScheduler loop (``unet(x, t)`` then ``step``) from the same x_0, over the whole chain."""
    diffusion = make_diffusion("cosine")
    sampler = DDIMSampler(diffusion, steps=25, spacing=spacing, clip_denoised=False)
    sched = reference(DDIMInverseScheduler, diffusion, clip_sample=False, timestep_spacing=spacing)
    sched.initial_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    sched.set_timesteps(25)
    assert sched.timesteps.tolist() == sampler.timesteps.flip(0).tolist()
    model = AnalyticModel(diffusion.alphas_cumprod_64, "eps")
    x = quantized_image(SHAPE)
    x_ref = x
    for t in sched.timesteps.tolist():
        x_ref = sched.step(model(x_ref, t), t, x_ref).prev_sample.float()
    x_ours = sampler.encode(model, x, num_steps=25)
    torch.testing.assert_close(x_ours, x_ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- spacings
@pytest.mark.parametrize("num_steps", [1, 7, 10, 20, 25, 50, 100, 250, 999, 1000])
def test_leading_and_trailing_spacings_match_diffusers(num_steps):
    """diffusers' "leading" (steps_offset=0) and "trailing"; its float ``arange`` breaks some exact x.5 ties the
    other way for trailing (K = 48) and even returns K + 1 steps (K = 61), so those K are not compared."""
    for spacing in ("leading", "trailing"):
        sched = DDIMScheduler(timestep_spacing=spacing)
        sched.set_timesteps(num_steps)
        assert sched.timesteps.flip(0).tolist() == spaced_timesteps(T, num_steps, spacing).tolist(), spacing

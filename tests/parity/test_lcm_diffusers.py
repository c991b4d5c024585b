"""LCM's multistep sampler (sampler=lcm) against diffusers' LCMScheduler: the same timesteps, the same analytic model
(the exact ε/x0/v of Gaussian data), the same noise.

Two comparisons. In float64 (diffusers' ᾱ replaced by our float64 table and its timesteps passed as Python ints, so
that its c_skip, c_out are Python floats too) the two agree to rounding: atol 1e-12. With diffusers' own float32
betas, ᾱ and c_skip/c_out, the difference is the float32 rounding of ᾱ (cumprod over 1000 factors: ≲ 1e-6 relative)
amplified by 1/sqrt(ᾱ_999) ≈ 15 in x̂_0: a 2e-5 relative tolerance. Elementwise arithmetic only, so the kernels
(ATEN_CPU_CAPABILITY) do not enter.
"""

from __future__ import annotations

import pytest
import torch

from difflab.samplers import LCMSampler, sample_loop
from difflab.schedules import GaussianDiffusion

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_lcm  # noqa: E402

F64 = torch.float64
MU, S2 = 0.3, 0.4**2  # data N(MU, S2) per element
PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def schedule() -> GaussianDiffusion:
    return GaussianDiffusion("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's


def exact_output(alphas_cumprod: torch.Tensor, parameterization: str) -> callable:
    """model(x_t, t): the exact network output of Gaussian data at (x_t, t), from the table ``alphas_cumprod``."""

    def model(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        ab = alphas_cumprod[torch.as_tensor(t).reshape(-1)].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x0 = MU + a * S2 / (ab * S2 + s**2) * (x - a * MU)
        eps = (x - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[parameterization]

    return model


def run_diffusers(z, steps, original, parameterization, clip, exact, seed, monkeypatch):
    scheduler = scheduling_lcm.LCMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        original_inference_steps=original,
        prediction_type=PREDICTION[parameterization],
        clip_sample=clip,
    )
    if exact:
        scheduler.alphas_cumprod = schedule().alphas_cumprod_64.clone()
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)  # the draws our sampler makes: float32 N(0, I), then widened
    monkeypatch.setattr(
        scheduling_lcm, "randn_tensor", lambda shape, **kw: torch.randn(shape, generator=generator).to(F64)
    )
    model = exact_output(scheduler.alphas_cumprod.to(F64), parameterization)
    sample = z.clone()
    for t in scheduler.timesteps:
        t = int(t) if exact else t  # an int keeps diffusers' c_skip, c_out in float64
        sample = scheduler.step(model(sample, int(t)), t, sample, generator=generator).prev_sample
    return sample, scheduler.timesteps.tolist()


@pytest.mark.parametrize(
    ("steps", "original", "parameterization", "clip"),
    [(1, 50, "eps", False), (2, 50, "eps", False), (4, 50, "v", True), (3, 50, "x0", False), (8, 25, "eps", True)],
)
@pytest.mark.parametrize("exact", [True, False], ids=["float64", "float32-diffusers"])
def test_matches_lcm_scheduler(steps, original, parameterization, clip, exact, monkeypatch):
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected, timesteps = run_diffusers(z, steps, original, parameterization, clip, exact, 7, monkeypatch)
    diffusion = schedule()
    sampler = LCMSampler(diffusion, parameterization, steps=steps, original_steps=original, clip_denoised=clip)
    model = exact_output(diffusion.alphas_cumprod_64, parameterization)
    ours = sample_loop(lambda x, t: model(x, t), sampler, z.shape, torch.Generator().manual_seed(7), noise=z.clone())
    assert sampler.timesteps.tolist() == timesteps
    assert sampler.nfe == steps and ours.dtype == F64  # one evaluation per step, float64 kept
    if exact:
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    else:
        torch.testing.assert_close(ours, expected, rtol=2e-5, atol=2e-5 * float(expected.abs().max()))


@pytest.mark.parametrize(("steps", "original"), [(1, 50), (2, 50), (4, 50), (5, 50), (7, 25), (50, 50), (3, 20)])
def test_timesteps_match_lcm_scheduler(steps, original):
    scheduler = scheduling_lcm.LCMScheduler(original_inference_steps=original)
    scheduler.set_timesteps(steps)
    sampler = LCMSampler(schedule(), "eps", steps=steps, original_steps=original)
    assert sampler.timesteps.tolist() == scheduler.timesteps.tolist()


def test_scalings_match_lcm_scheduler():
    from difflab.schedules.latent_consistency import LCMBoundary

    scheduler = scheduling_lcm.LCMScheduler()
    for t in (0, 1, 19, 499, 999):
        ours = LCMBoundary(10.0, 0.5).scalings(t)
        assert ours == pytest.approx(scheduler.get_scalings_for_boundary_condition_discrete(t), rel=1e-15)

"""Multistep consistency sampling (sampler=consistency) against diffusers' CMStochasticIterativeScheduler: the same σ
points, the same analytic model, the same noise, computed in float64 on both sides.

Tolerance from the computation: diffusers keeps its σ table and its c_skip/c_out in float32 (a few ulp, ~2e-7
relative) of x̃ ~ σ_0 z: the results agree to a few ulp of float32 times σ_0 max|z|; our σ points are
diffusers' float32 values, so nothing else differs. Kernels (ATEN_CPU_CAPABILITY) do not enter at that size.
"""

from __future__ import annotations

import pytest
import torch

from difflab.samplers import ConsistencySampler, sample_loop
from difflab.schedules import SigmaProcess

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_consistency_models as cm  # noqa: E402

F64 = torch.float64
MU, S2, SD = 0.1, 0.2**2, 0.5  # data N(MU, S2) per pixel; σ_d of the scalings


def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact D(x̃; σ) = E[x_0 | x̃] for x_0 ~ N(MU, S2)."""
    sigma = sigma.to(F64).reshape(-1, *([1] * (x.ndim - 1)))
    return MU + S2 / (S2 + sigma**2) * (x - MU)


def edm_output(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """F with D = c_skip^EDM x + c_out^EDM F (Karras et al. eq. 7): the raw network diffusers' step expects."""
    c_skip, c_out = SD**2 / (sigma**2 + SD**2), sigma * SD / (sigma**2 + SD**2) ** 0.5
    return (denoiser(x, torch.tensor([sigma])) - c_skip * x) / c_out


def run_diffusers(timesteps: list[int] | None, steps: int | None, z: torch.Tensor, seed: int, clip: bool, monkeypatch):
    scheduler = cm.CMStochasticIterativeScheduler(num_train_timesteps=40, clip_denoised=clip)  # σ 0.002–80, σ_d 0.5
    scheduler.set_timesteps(num_inference_steps=steps, timesteps=timesteps)
    generator = torch.Generator().manual_seed(seed)  # the draws our sampler makes: float32 N(0, I), then widened
    monkeypatch.setattr(cm, "randn_tensor", lambda shape, **kw: torch.randn(shape, generator=generator).to(F64))
    sample = z * float(scheduler.sigmas[0])
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        output = edm_output(sample, sigma)  # the model sees scale_model_input(sample); F is computed from x̃ itself
        sample = scheduler.step(output, t, sample, generator=generator).prev_sample
    return sample, scheduler.sigmas[:-1].double().tolist()


@pytest.mark.parametrize(
    ("timesteps", "steps", "clip"),
    [(None, 1, True), ([22, 0], None, False), ([30, 17, 5, 0], None, True), (None, 4, False)],
)
def test_matches_cm_stochastic_iterative_scheduler(timesteps, steps, clip, monkeypatch):
    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected, sigmas = run_diffusers(timesteps, steps, z, seed=7, clip=clip, monkeypatch=monkeypatch)
    process = SigmaProcess("edm", sigma_min=0.002, sigma_max=80.0)
    sampler = ConsistencySampler(process, "x0", sigmas=sigmas, clip_denoised=clip)  # diffusers' float32 σ points
    ours = sample_loop(
        lambda x, t: denoiser(x, t),
        sampler,
        z.shape,
        torch.Generator().manual_seed(7),
        noise=z * sampler.init_noise_sigma,
    )
    assert sampler.nfe == len(sigmas)  # one evaluation per step
    assert ours.dtype == F64
    # diffusers' float32 c_skip, c_out: 4 ulp (2⁻²⁴ each) of the largest |x̃| on the chain, σ_0 max|z|
    atol = 4 * 2.0**-24 * sigmas[0] * float(z.abs().max())
    torch.testing.assert_close(ours, expected, rtol=0, atol=atol)


def test_automatic_points():
    """steps=N picks the first N points of a Karras grid of N + 1 (its last, σ_min, would add no noise)."""
    sampler = ConsistencySampler(SigmaProcess("edm", sigma_min=0.002, sigma_max=80.0), "x0", steps=2)
    assert sampler.sigmas.tolist() == pytest.approx([80.0, ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7], rel=1e-12)
    assert sampler.timesteps.tolist() == pytest.approx(sampler.sigmas.tolist(), rel=1e-6)  # a σ process's t is σ

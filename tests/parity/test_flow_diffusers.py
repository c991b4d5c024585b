"""Rectified-flow samplers against diffusers' FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler:
the same analytic velocity (``analytic.flow_velocity``), the same x_1 and the same τ steps, every step of the chain
compared in float32; and the interpolation against ``scale_noise``.

Deliberate difference, pinned below: with only ``num_inference_steps`` diffusers steps over linspace(1, σ_min, N)
and then to 0 (its σ_min is the first training σ, 1/T, shifted), so N = 2 spends its second step on τ = 0.001 → 0;
difflab's Euler steps uniformly from 1 to 0 (τ_i = 1 − i/N, Liu et al.), its Heun as diffusers (σ_min shifted once).
The chains are compared on difflab's steps, given to diffusers.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from difflab.samplers import FlowEulerSampler, FlowHeunSampler
from difflab.schedules import Parameterization, RectifiedFlow, flow_times
from tests.parity.analytic import flow_velocity, pattern, quantized_image

T = 1000
SHAPE = (2, 3, 8, 8)


def model(x: torch.Tensor, t: float) -> torch.Tensor:
    return flow_velocity(x, float(t) / T).float()


def run_both(sampler, scheduler) -> None:
    """Step difflab and diffusers from the same x_1, feeding both diffusers' x at every step."""
    torch.testing.assert_close(sampler.timesteps, scheduler.timesteps.float(), rtol=1e-6, atol=1e-4)
    x = pattern(SHAPE, seed=1)
    for t in sampler.timesteps.tolist():
        out = model(x, t)
        ours = sampler.step(out, t, x).prev_sample
        x = scheduler.step(out, torch.tensor(t), x).prev_sample.float()
        atol = 2e-5 * max(1.0, x.abs().max().item())
        torch.testing.assert_close(ours, x, rtol=1e-5, atol=atol, msg=lambda m, t=t: f"t={t}: {m}")


@pytest.mark.parametrize("steps", [1, 2, 7, 25])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_chain_matches_flow_match_euler(steps, shift):
    sampler = FlowEulerSampler(RectifiedFlow(T), Parameterization.V, steps=steps, shift=shift)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    scheduler.set_timesteps(sigmas=flow_times(steps)[:-1].tolist())  # unshifted: diffusers applies the shift
    torch.testing.assert_close(sampler.sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=1e-7)
    run_both(sampler, scheduler)


@pytest.mark.parametrize("steps", [2, 5, 12])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_heun_chain_matches_flow_match_heun(steps, shift):
    sampler = FlowHeunSampler(RectifiedFlow(T), Parameterization.V, steps=steps, shift=shift)
    scheduler = FlowMatchHeunDiscreteScheduler(num_train_timesteps=T, shift=shift)
    scheduler.set_timesteps(steps)
    sigmas = sampler.sigmas.float()  # difflab's steps in diffusers' layout (interior levels twice)
    scheduler.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
    scheduler.timesteps = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2)]) * T
    assert len(sampler.timesteps) == 2 * steps - 1 == sampler.num_evaluations(steps)
    run_both(sampler, scheduler)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_default_steps_differ_from_diffusers_by_design(shift):
    """diffusers: linspace(1, s(1/T), N), shifted (its σ_min is the shifted 1/T of its training σ, so that end is
    shifted twice); difflab: linspace(1, 0, N + 1)[:N], shifted once (module docstring)."""
    s = lambda tau: shift * tau / (1 + (shift - 1) * tau)  # noqa: E731
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    scheduler.set_timesteps(4)
    theirs = torch.linspace(1.0, s(1.0 / T), 4, dtype=torch.float64)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), s(theirs), rtol=1e-6, atol=1e-7)
    ours = FlowEulerSampler(RectifiedFlow(T), Parameterization.V, steps=4, shift=shift).sigmas
    uniform = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ours, s(uniform))
    # Heun ends its grid as diffusers does, at the smallest training time (shifted once here, twice there), since
    # its last step to 0 is Euler; unshifted, the two grids are the same
    heun = FlowHeunSampler(RectifiedFlow(T), Parameterization.V, steps=4, shift=shift).sigmas
    torch.testing.assert_close(heun[:-1], s(torch.linspace(1.0, 1.0 / T, 4, dtype=torch.float64)))
    if shift == 1.0:
        scheduler = FlowMatchHeunDiscreteScheduler(num_train_timesteps=T)
        scheduler.set_timesteps(4)
        torch.testing.assert_close(heun[:-1].float(), scheduler.sigmas[::2], rtol=1e-6, atol=1e-7)


def test_interpolation_matches_scale_noise():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T)
    scheduler.set_timesteps(10)
    x0, noise = quantized_image(SHAPE), pattern(SHAPE, seed=2)
    t = scheduler.timesteps[[0, 4]]
    ours = RectifiedFlow(T).q_sample(x0, t, noise)
    for i in range(2):
        ref = scheduler.scale_noise(x0[i : i + 1], t[i : i + 1], noise[i : i + 1])
        torch.testing.assert_close(ours[i : i + 1], ref)

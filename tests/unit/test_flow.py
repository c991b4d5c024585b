"""Rectified flow: the interpolation and target in closed form, the flow samplers on Gaussian oracles (one Euler step
exact on a straight coupling; the 1-rectified flow's ODE transports N(0, I) to the data Gaussian), straightness,
SD3's training-time distributions, process/sampler mismatches and CFG's NFE through the module."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.losses import FlowTimestepSampler
from difflab.metrics import trajectory_straightness
from difflab.modules import DiffusionModule
from difflab.samplers import DDIMSampler, FlowEulerSampler, FlowHeunSampler, sample_loop
from difflab.schedules import GaussianDiffusion, Parameterization, RectifiedFlow, shift_time
from tests.conftest import TINY_NETS
from tests.parity.analytic import MU, STD, flow_velocity, pattern

T = 1000
FLOW = RectifiedFlow(T)


def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact velocity of the 1-rectified flow of per-pixel N(MU, STD²) data (t in network units)."""
    return flow_velocity(x, t.double() / T, wiggle=0.0).float()


def straight(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight coupling x_0 = STD ε + MU (the 2-rectified flow of that data: the linear OT map):
    with x_τ = ((1 − τ) STD + τ) ε + (1 − τ) MU, v = ε − x_0 = (1 − STD) ε − MU."""
    tau = t.double().reshape(-1, *([1] * (x.ndim - 1))) / T
    eps = (x.double() - (1 - tau) * MU) / ((1 - tau) * STD + tau)
    return ((1 - STD) * eps - MU).float()


def test_interpolation_and_target_in_closed_form():
    x0, eps = pattern((3, 1, 4, 4), seed=1), pattern((3, 1, 4, 4), seed=2)
    t = torch.tensor([0.0, 250.0, 1000.0])
    x_t = FLOW.q_sample(x0, t, eps)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(x_t[2], eps[2])
    v = FLOW.training_target(Parameterization.V, x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(FLOW.training_target(Parameterization.X0, x0, eps, t), x0)
    for param, out in ((Parameterization.V, v[1:2]), (Parameterization.X0, x0[1:2])):  # both give the same (x̂_0, v̂)
        x0_hat, v_hat = FLOW.x0_velocity(param, out, x_t[1:2], 0.25)
        torch.testing.assert_close(x0_hat, x0[1:2])
        torch.testing.assert_close(v_hat, v[1:2])


def test_one_euler_step_is_exact_on_a_straight_coupling():
    eps = pattern((4, 1, 8, 8), seed=3)
    sampler = FlowEulerSampler(FLOW, Parameterization.V, steps=1)
    torch.testing.assert_close(sample_loop(straight, sampler, eps.shape, noise=eps), STD * eps + MU)
    assert sampler.nfe == 1
    # the 1-rectified flow is not straight: one step misses (so the check above can fail)
    one_step = sample_loop(oracle, FlowEulerSampler(FLOW, Parameterization.V, steps=1), eps.shape, noise=eps)
    many = sample_loop(oracle, FlowHeunSampler(FLOW, Parameterization.V, steps=40), eps.shape, noise=eps)
    assert (one_step - many).abs().max() > 0.05


@pytest.mark.parametrize("sampler_class, steps, atol", [(FlowEulerSampler, 200, 0.03), (FlowHeunSampler, 25, 0.01)])
def test_ode_of_the_1_rectified_flow_transports_noise_to_the_data_gaussian(sampler_class, steps, atol):
    noise = torch.randn((20000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    sampler = sampler_class(FLOW, Parameterization.V, steps=steps)
    x0 = sample_loop(oracle, sampler, noise.shape, noise=noise)
    # the exact map is x_0 = MU + STD ε (a monotone 1-D transport), so also per sample
    torch.testing.assert_close(x0, MU + STD * noise, atol=atol, rtol=0)  # Euler: first order
    assert x0.mean().item() == pytest.approx(MU, abs=0.02)
    assert x0.std().item() == pytest.approx(STD, abs=0.02)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_heun_keeps_the_spread_of_gaussian_data_at_ten_steps(shift):
    """With the exact velocity of N(MU, STD²) data, 10 Heun steps (19 NFE) must land on the transport map
    MU + STD ε. A grid ending at τ = 1/N closed with an Euler step to 0 returns E[x_0 | x_τ] there and shrank the
    spread (shift 3: std 0.42 for STD 0.5, worst error 0.34); ending at 1/T: 0.49 and 0.045."""
    noise = torch.randn((20000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    sampler = FlowHeunSampler(FLOW, Parameterization.V, steps=10, shift=shift)
    x0 = sample_loop(oracle, sampler, noise.shape, noise=noise)
    assert sampler.nfe == 19
    assert x0.std().item() == pytest.approx(STD, rel=0.03)
    assert (x0 - (MU + STD * noise)).abs().max().item() < 0.06


def test_straightness_is_zero_on_a_straight_coupling_and_positive_otherwise():
    noise = pattern((8, 1, 4, 4), seed=4)
    sampler = FlowEulerSampler(FLOW, Parameterization.V, steps=20)
    assert trajectory_straightness(straight, sampler, noise).abs().max().item() < 1e-8
    curved = trajectory_straightness(oracle, sampler, noise)
    assert (curved > 1e-3).all()


def test_shifted_steps_follow_sd3():
    sampler = FlowEulerSampler(FLOW, Parameterization.V, steps=4, shift=3.0)
    tau = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sampler.sigmas, 3 * tau / (1 + 2 * tau))
    torch.testing.assert_close(sampler.timesteps, (sampler.sigmas[:-1] * T).float())
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shift"):
        FlowEulerSampler(FLOW, Parameterization.V, steps=4, shift=0.0)


def _cdf_distance(samples: torch.Tensor, quantile) -> float:
    """max |F̂(q(u)) − u| over u on a grid: q is the distribution's quantile function."""
    u = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    return max(abs((samples.double() <= quantile(p)).double().mean().item() - p.item()) for p in u)


@pytest.mark.parametrize(
    "distribution, quantile",
    [
        ("uniform", lambda p: p),
        ("logit_normal", lambda p: torch.sigmoid(0.5 + 0.8 * math.sqrt(2) * torch.erfinv(2 * p - 1))),
        ("mode", lambda p: 1 - p - 1.29 * (torch.cos(math.pi / 2 * p) ** 2 - 1 + p)),  # decreasing in p: 1 − u
    ],
)
def test_training_time_distributions(distribution, quantile):
    sampler = FlowTimestepSampler(T, distribution, loc=0.5, scale=0.8)
    torch.manual_seed(0)
    t, weights = sampler.sample(40000, "cpu")
    assert t.dtype == torch.float32 and weights.eq(1).all() and 0 <= t.min() and t.max() <= T
    if distribution == "mode":  # τ = f(u) with f decreasing: P(τ ≤ f(p)) = 1 − p
        assert _cdf_distance(1 - t / T, lambda p: 1 - quantile(p)) < 0.01
    else:
        assert _cdf_distance(t / T, quantile) < 0.01


def test_one_step_distillation_draws_tau_one_and_bad_settings_fail():
    t, _ = FlowTimestepSampler(T, "one_step").sample(5, "cpu")
    assert t.eq(T).all()
    with pytest.raises(ValueError, match="distribution"):
        FlowTimestepSampler(T, "lognormal")
    with pytest.raises(ValueError, match="scale"):
        FlowTimestepSampler(T, "logit_normal", scale=0.0)


def test_a_sampler_of_the_other_process_is_refused():
    with pytest.raises(ValueError, match="flow_euler"):
        DDIMSampler(FLOW, Parameterization.V, steps=5)
    with pytest.raises(ValueError, match="flow process"):
        FlowEulerSampler(GaussianDiffusion(num_timesteps=50), Parameterization.V, steps=5)
    with pytest.raises(ValueError, match="sigma_schedule"):
        FlowEulerSampler(FLOW, Parameterization.V, steps=5, sigma_schedule="karras")


class Wrapped(torch.nn.Module):
    """A network replaced by ``fn(x, t, y)`` (a spy, or a fixed output)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x, t, y=None):
        return self.fn(x, t, y)


def flow_module(**kwargs) -> DiffusionModule:
    torch.manual_seed(0)
    module = DiffusionModule(
        net=TINY_NETS["unet"],
        schedule=RectifiedFlow(T),
        image_shape=(1, 8, 8),
        optimizer=torch.optim.Adam,
        timestep_sampler=FlowTimestepSampler,
        sampler=FlowEulerSampler,
        **{"parameterization": "v", **kwargs},
    )
    module.log = lambda *args, **kw: None
    return module


@pytest.mark.parametrize("parameterization, match", [("eps", "ε-prediction"), ("x0", None)])
def test_the_module_takes_v_and_x0_and_refuses_eps(parameterization, match):
    if match:
        with pytest.raises(ValueError, match=match):
            flow_module(parameterization=parameterization)
    else:
        module = flow_module(parameterization=parameterization)
        assert torch.isfinite(module.training_step((torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)), 0))


def test_the_loss_is_the_velocity_regression_and_a_coupling_replaces_the_noise():
    module = flow_module()
    x0, y, eps = pattern((4, 1, 8, 8), seed=5), torch.zeros(4, dtype=torch.long), pattern((4, 1, 8, 8), seed=6)
    v_hat = 0.5 * (eps - x0)  # half the target, not 0: E‖(ε − x_0) − v̂‖² is 9x smaller than with the sign flipped
    module.net = Wrapped(lambda x, t, y: v_hat)
    expected = (eps - x0 - v_hat).pow(2).mean()
    torch.testing.assert_close(module.training_step((x0, y, eps), 0), expected)


def test_guided_heun_counts_network_evaluations_and_batches_both_conditions():
    module = flow_module(num_classes=3, p_uncond=0.1, guidance_scale=2.0)
    seen = []
    net = module.net
    module.net = Wrapped(lambda x, t, y: seen.append((x.shape[0], t.max().item())) or net(x, t, y))
    sampler = module.build_sampler(lambda **kw: FlowHeunSampler(steps=4, **kw))
    images = module.sample(5, torch.Generator().manual_seed(0), sampler)
    assert images.shape == (5, 1, 8, 8) and sampler.nfe == 7 == len(seen)
    assert {n for n, _ in seen} == {10} and seen[0][1] == pytest.approx(T)  # the 2B batch; starts at t = T

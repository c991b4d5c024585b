"""The σ process (schedules/edm.py): training σ of each preconditioning, the F-space loss = λ(σ)‖D − x_0‖² for every
row of EDM's Table 1, and the errors at construction."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.schedules import SigmaProcess
from difflab.schedules import sigma_paths as paths

N = 20000


def draws(name: str, **kwargs) -> torch.Tensor:
    return SigmaProcess(name, **kwargs).sample_sigma(N, "cpu", torch.Generator().manual_seed(0)).double()


def test_training_sigma_distributions():
    edm = draws("edm").log()
    assert abs(float(edm.mean()) + 1.2) < 0.03 and abs(float(edm.std()) - 1.2) < 0.03
    ve = draws("ve", sigma_min=0.01, sigma_max=25.0)
    assert float(ve.min()) >= 0.01 and float(ve.max()) <= 25.0
    midpoint = 0.5 * (math.log(0.01) + math.log(25.0))  # log-uniform: the mean of ln σ is the midpoint
    assert abs(float(ve.log().mean()) - midpoint) < 0.05
    for name, path in (("vp", paths.vp_sigma), ("subvp", paths.subvp_sigma)):
        sigma = draws(name)
        ends = path(torch.tensor([1e-5, 1.0], dtype=torch.float64), 0.1, 19.9)
        assert float(sigma.min()) >= float(ends[0]) * 0.999 and float(sigma.max()) <= float(ends[1]) * 1.001
        t = (paths.subvp_time if name == "subvp" else paths.vp_time)(sigma, 0.1, 19.9)
        assert abs(float(t.mean()) - 0.5) < 0.01  # t ~ U(ε_t, 1)
    iddpm = SigmaProcess("iddpm")
    sigma = iddpm.sample_sigma(1000, "cpu", torch.Generator().manual_seed(1))
    assert torch.isin(sigma, iddpm.u[:-1]).all()


@pytest.mark.parametrize("name", ["edm", "vp", "subvp", "ve", "iddpm"])
def test_f_space_loss_is_the_weighted_denoising_loss(name):
    """‖F − (x_0 − c_skip x̃)/c_out‖² = λ(σ)‖D − x_0‖² with λ = 1/c_out², in float64, for any F."""
    process = SigmaProcess(name)
    x0 = torch.rand(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    noise = torch.randn(4, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=torch.float64)
    x = process.q_sample(x0, sigma, noise)
    net = lambda x_in, c_noise: torch.sin(x_in) + 1e-3 * c_noise.reshape(-1, 1, 1, 1)  # noqa: E731
    c = process.scalings(process.expand(sigma, x))
    f_space = ((net(c.c_in * x, c.c_noise.flatten()) - process.training_target(x0, x, sigma)) ** 2).flatten(1).sum(1)
    weighted = process.loss_weight(sigma) * ((process.precondition(net, x, sigma) - x0) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(f_space, weighted, rtol=1e-9, atol=1e-12)


def test_edm_weight_and_the_exact_denoiser():
    """λ(σ) = (σ² + σ_d²)/(σ σ_d)²; and F = 0 makes D = c_skip x̃, the exact denoiser of N(0, σ_d²) data."""
    process = SigmaProcess("edm", sigma_data=0.5)
    sigma = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    torch.testing.assert_close(process.loss_weight(sigma), (sigma**2 + 0.25) / (sigma * 0.5) ** 2)
    x = torch.ones(3, 1, 1, 1, dtype=torch.float64)
    denoised = process.precondition(lambda x_in, c: torch.zeros_like(x_in), x, sigma).flatten()
    torch.testing.assert_close(denoised, 0.25 / (0.25 + sigma**2))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"preconditioning": "ncsn"}, "preconditioning"),
        ({"sigma_min": 5.0, "sigma_max": 1.0}, "sigma_min"),
        ({"sigma_data": 0.0}, "sigma_data"),
        ({"P_std": -1.0}, "P_std"),
        ({"epsilon_t": 0.0}, "epsilon_t"),
    ],
)
def test_bad_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        SigmaProcess(**kwargs)

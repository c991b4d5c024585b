"""EDM (Karras et al. 2022) against k-diffusion: the preconditioning and its loss (``k_diffusion.layers.Denoiser``),
the Karras σ steps, and Heun's sampler with and without churn (``k_diffusion.sampling.sample_heun``, Algorithms 1
and 2), on the same analytic denoiser, inputs and noise. Values are float32 on both sides; tolerances are float32
round-off over the chain (the σ steps are float64 here, float32 in k-diffusion: ~1e-7 relative each)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from difflab.modules import EDMModule
from difflab.samplers import EDMSampler, HeunSampler, sample_loop
from difflab.schedules import SigmaProcess
from tests.parity.analytic import MU, STD, pattern
from tests.parity.kdiffusion import k_diffusion

SIGMA_DATA = 0.5


def analytic_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """D(x; σ): the exact posterior mean of N(MU, STD²) data plus a smooth σ-dependent term (so that a wrong σ or
    coefficient shows). σ: (B,)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return (STD**2 * x + s**2 * MU) / (STD**2 + s**2) + 0.2 * s / (1 + s**2) * torch.sin(3 * x)


def inner(x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """F(c_in x; σ): any smooth function of both (k-diffusion's inner model gets σ itself)."""
    s = sigma.reshape(-1, 1, 1, 1)
    return torch.tanh(x_in) * (1 + 0.1 * s.log()) + 0.05 * s.sqrt()


class CNoiseNet(nn.Module):
    """Our net contract ``net(x, t, y)`` with t = c_noise = ¼ ln σ: the same F as :func:`inner`."""

    def forward(self, x, t, y=None):
        return inner(x, (4 * t).exp())


def edm_module(preconditioning: str = "edm") -> EDMModule:
    return EDMModule(
        net=lambda **_: CNoiseNet(),
        schedule=SigmaProcess(preconditioning, sigma_data=SIGMA_DATA),
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        image_shape=[2, 4, 4],
        sampler=functools.partial(HeunSampler, steps=4, sigma_schedule="karras"),
    )


SIGMAS = torch.tensor([0.002, 0.03, 0.5, 1.0, 7.0, 80.0])


def test_scalings_match_k_diffusion():
    reference = k_diffusion("layers").Denoiser(inner, sigma_data=SIGMA_DATA).get_scalings(SIGMAS.double())
    ours = SigmaProcess("edm", sigma_data=SIGMA_DATA).scalings(SIGMAS.double())
    for name, ref, got in zip(
        ("c_skip", "c_out", "c_in"), reference, (ours.c_skip, ours.c_out, ours.c_in), strict=True
    ):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0, msg=name)
    torch.testing.assert_close(ours.c_noise, SIGMAS.double().log() / 4)  # EDM's c_noise (k-diffusion passes σ)


def test_denoiser_matches_k_diffusion():
    x = pattern((6, 2, 4, 4), seed=3, scale=5.0)
    reference = k_diffusion("layers").Denoiser(inner, sigma_data=SIGMA_DATA)(x, SIGMAS)
    torch.testing.assert_close(edm_module()(x, SIGMAS), reference, rtol=1e-5, atol=1e-6)


def test_loss_matches_k_diffusion_and_the_papers_weighted_form():
    """||F − target||² (k-diffusion's Denoiser.loss) = λ(σ)||D − x_0||² with λ = (σ² + σ_d²)/(σ σ_d)² (EDM eq. 8)."""
    x_start, noise = pattern((6, 2, 4, 4), seed=1).clamp(-1, 1), pattern((6, 2, 4, 4), seed=2)
    ours = edm_module().diffusion_loss(x_start, None, SIGMAS, noise)["loss"]
    reference = k_diffusion("layers").Denoiser(inner, sigma_data=SIGMA_DATA).loss(x_start, noise, SIGMAS)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    denoised = edm_module()(x_start + SIGMAS.reshape(-1, 1, 1, 1) * noise, SIGMAS).double()
    weight = (SIGMAS.double() ** 2 + SIGMA_DATA**2) / (SIGMAS.double() * SIGMA_DATA) ** 2
    weighted = weight * ((denoised - x_start.double()) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(ours.double(), weighted, rtol=2e-3, atol=1e-6)  # D − x_0 loses digits at σ = 0.002
    torch.testing.assert_close(SigmaProcess("edm").loss_weight(SIGMAS.double()), weight)


def test_training_sigma_is_edms_log_normal():
    """EDM's EDMLoss draws σ = exp(P_mean + P_std n) from one normal per image: the same n gives the same σ, and
    the law matches k-diffusion's ``rand_log_normal`` (quantiles of 20,000 draws within Monte-Carlo error)."""
    process = SigmaProcess("edm", P_mean=-1.2, P_std=1.2)
    ours = process.sample_sigma(8, "cpu", torch.Generator().manual_seed(0))
    normal = torch.randn(8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, (-1.2 + 1.2 * normal).exp())
    torch.manual_seed(0)
    reference = k_diffusion("utils").rand_log_normal([20000], loc=-1.2, scale=1.2)
    draws = process.sample_sigma(20000, "cpu", torch.Generator().manual_seed(1))
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(draws.log().quantile(q), reference.log().quantile(q), rtol=0, atol=0.05)


def test_karras_steps_match_k_diffusion():
    reference = k_diffusion("sampling").get_sigmas_karras(18, 0.002, 80.0, rho=7.0)
    sampler = HeunSampler(SigmaProcess("edm"), parameterization="x0", steps=18, sigma_schedule="karras")
    torch.testing.assert_close(sampler.sigmas.float(), reference, rtol=1e-6, atol=0)


def run_ours(sampler, x_T: torch.Tensor) -> torch.Tensor:
    return sample_loop(lambda x, t: analytic_denoiser(x, t), sampler, x_T.shape, noise=x_T)


@pytest.mark.parametrize("steps", [1, 2, 18])
def test_heun_matches_k_diffusion(steps):
    """Algorithm 1 (S_churn = 0): sampler=heun and sampler=edm with no churn both equal ``sample_heun``."""
    sigmas = k_diffusion("sampling").get_sigmas_karras(steps, 0.002, 80.0, rho=7.0)
    x_T = pattern((2, 2, 4, 4), seed=5) * sigmas[0]
    reference = k_diffusion("sampling").sample_heun(analytic_denoiser, x_T.clone(), sigmas, disable=True)
    kwargs = {"parameterization": "x0", "steps": steps, "sigma_schedule": "karras", "clip_denoised": False}
    for cls in (HeunSampler, EDMSampler):
        sampler = cls(SigmaProcess("edm"), **kwargs)
        torch.testing.assert_close(run_ours(sampler, x_T), reference, rtol=1e-4, atol=1e-5, msg=cls.__name__)
        assert sampler.nfe == 2 * steps - 1


def test_edm_stochastic_sampler_matches_k_diffusion():
    """Algorithm 2 with EDM's ImageNet-64 churn settings (S_tmax = 50 < σ_max: no churn at the first step), the same
    churn noise fed to both (k-diffusion draws one per step and uses those where γ_i > 0)."""
    steps, churn = 12, dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
    sampling = k_diffusion("sampling")
    sigmas = sampling.get_sigmas_karras(steps, 0.002, 80.0, rho=7.0)
    x_T = pattern((2, 2, 4, 4), seed=6) * sigmas[0]
    torch.manual_seed(123)
    reference = sampling.sample_heun(analytic_denoiser, x_T.clone(), sigmas, disable=True, **churn)
    torch.manual_seed(123)
    draws = [torch.randn_like(x_T) for _ in range(steps)]  # k-diffusion's draws, in order
    sampler = EDMSampler(
        SigmaProcess("edm"),
        parameterization="x0",
        steps=steps,
        sigma_schedule="karras",
        clip_denoised=False,
        S_churn=40.0,
        S_tmin=0.05,
        S_tmax=50.0,
        S_noise=1.003,
    )
    churned = [i for i, gamma in enumerate(sampler.gammas) if gamma > 0]
    assert churned and churned[0] > 0 and math.isclose(sampler.gammas[churned[0]], min(40 / steps, 2**0.5 - 1))
    feed = iter(draws[i] for i in churned)
    sampler.noise = lambda x, generator: next(feed)
    torch.testing.assert_close(run_ours(sampler, x_T), reference, rtol=1e-4, atol=1e-5)
    assert next(feed, None) is None  # every churn draw was used, in order

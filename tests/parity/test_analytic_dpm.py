"""Parity with the authors' code (baofff/Analytic-DPM, commit 2d7a28c): the σ² of every step of
``reverse_ddpm_ms_eps`` and ``reverse_ddim_ms_eps`` (cifar_imagenet_codes/core/inference/sampler/) for a fixed Γ and
the linear schedule, 10 steps of their "linear" trajectory (= our ``spacing=even`` + 1: their n is 1-based), with
their CIFAR-10 settings (clip_sigma_idx=1; clip_pixel 2 for Analytic-DDPM on the linear schedule, 1 for DDIM).

The pinned values were computed by this script (their lines, without the model):

    # The sigma2 of each step of baofff/Analytic-DPM's reverse_ddpm_ms_eps / reverse_ddim_ms_eps
    # (cifar_imagenet_codes/core/inference/sampler/), their lines copied without the model; betas as their
    # profiles (np.append(0., linear betas)), Γ (ms_eps) a fixed function of n.
    import math
    import numpy as np

    def choice_steps_linear(N, sample_steps):  # core/inference/utils.py
        frac_stride = (N - 1) / (sample_steps - 1)
        cur_idx = 1.0
        steps = []
        for _ in range(sample_steps):
            steps.append(round(cur_idx))
            cur_idx += frac_stride
        return steps

    def sigma2s(betas, ms_eps, sample_steps, ddim, eta, clip_sigma_idx, clip_pixel):
        N = len(betas) - 1
        ns = choice_steps_linear(N, sample_steps)
        alphas = 1. - betas
        cum_alphas = alphas.cumprod()
        cum_betas = 1. - cum_alphas
        out = []
        for s, r in list(zip([0] + ns, ns))[::-1]:
            skip_alpha = alphas[s + 1: r + 1].prod()
            skip_beta = 1. - skip_alpha
            cum_alpha_s, cum_alpha_r, cum_beta_s, cum_beta_r = cum_alphas[s], cum_alphas[r], cum_betas[s], cum_betas[r]
            if s == 0:
                out.append(0.0)
                continue
            sigma2_small = skip_beta * cum_beta_s / cum_beta_r
            cov_x_0_pred = cum_beta_r / cum_alpha_r * (1. - ms_eps[r])
            cov_x_0_pred_clamp = np.clip(cov_x_0_pred, 0., 1.)
            if ddim:
                lamb2 = eta ** 2 * sigma2_small
                coeff_cov_x_0 = (cum_alpha_s ** 0.5 - ((cum_beta_s - lamb2) * cum_alpha_r / cum_beta_r) ** 0.5) ** 2
                sigma2 = lamb2 + coeff_cov_x_0 * cov_x_0_pred_clamp
            else:
                coeff_cov_x_0 = cum_alpha_s * skip_beta ** 2 / cum_beta_r ** 2
                sigma2 = sigma2_small + coeff_cov_x_0 * cov_x_0_pred_clamp
            if s < ns[clip_sigma_idx]:
                sigma2_threshold = (clip_pixel * 2. / 255. * (math.pi / 2.) ** 0.5) ** 2
                sigma2 = np.clip(sigma2, 0., sigma2_threshold)
            out.append(float(sigma2))
        return out[::-1]  # ascending: the step out of ns[0] first

    T = 1000
    betas = np.append(0., np.linspace(1e-4, 0.02, T, dtype=np.float64))
    n = np.arange(T + 1)
    ms_eps = 1.02 - 0.9 * np.exp(-n / 150.0)  # Γ_n; > 1 from n ≈ 546 on (clipped to the lower bound there)
    for name, kw in [("ddpm", dict(ddim=False, eta=0.0, clip_pixel=2)),
                     ("ddim_eta0", dict(ddim=True, eta=0.0, clip_pixel=1)),
                     ("ddim_eta05", dict(ddim=True, eta=0.5, clip_pixel=1))]:
        print(name, repr(sigma2s(betas, ms_eps, 10, clip_sigma_idx=1, **kw)))
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.samplers import AncestralSampler, DDIMSampler
from difflab.schedules import GaussianDiffusion

PINNED = {  # ascending: the step out of their ns[0] = our timestep 0 first
    "ddpm": [0.0, 0.00038650890009563, 0.16621059788341466, 0.32186529163672595, 0.4828600174828598,
             0.6143772199110348, 0.7216911495607926, 0.7948827492394961, 0.8441072059110813, 0.8795283582821891],
    "ddim_eta0": [0.0, 9.66272250239075e-05, 0.03125862944483324, 0.01887180155241518, 0.010009093369452928,
                  0.0012901642507010243, 0.0, 0.0, 0.0, 0.0],
    "ddim_eta05": [0.0, 9.66272250239075e-05, 0.06191811026509195, 0.09241157990965446, 0.12703163596921158,
                   0.1544153966140079, 0.18042278739019815, 0.19872068730987402, 0.21102680147777034,
                   0.21988208957054728],
}  # fmt: skip


def their_gamma() -> torch.Tensor:
    n = np.arange(1, 1001)  # their ms_eps[1:], our Γ[0:]
    return torch.from_numpy(1.02 - 0.9 * np.exp(-n / 150.0))


@pytest.mark.parametrize("name", sorted(PINNED))
def test_sigma2_matches_the_authors_code(name):
    diffusion = GaussianDiffusion(beta_schedule="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
    if name == "ddpm":
        sampler = AncestralSampler(diffusion, variance_type="analytic", gamma=their_gamma(), steps=10)
        sigma2 = sampler._table["log_variance_analytic"].double().exp()
    else:
        eta = 0.5 if name.endswith("05") else 0.0
        sampler = DDIMSampler(
            diffusion, variance_type="analytic", gamma=their_gamma(), steps=10, eta=eta, spacing="even"
        )
        sigma2 = sampler._table["sigma"].double() ** 2
    assert sampler.timesteps.flip(0).tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    torch.testing.assert_close(sigma2, torch.tensor(PINNED[name], dtype=torch.float64), rtol=2e-6, atol=1e-12)

"""The score-SDE family against values pinned from the authors' code, yang-song/score_sde_pytorch at commit cb1f359
(``sde_lib.py`` and ``sampling.py`` unchanged, ``models/utils.py`` stubbed as they are unused; ``torch.randn_like``
replaced by ``pattern(shape, seed=100 + n)`` for its n-th call; the score function and inputs below). The values were
printed by that script in float32; the tolerances are float32 round-off."""

from __future__ import annotations

import torch

from difflab.samplers import PredictorCorrectorSampler
from difflab.schedules import SigmaProcess
from difflab.schedules import sigma_paths as paths
from tests.parity.analytic import MU, STD, pattern

T = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
# sde.marginal_prob(ones, t) of VPSDE(0.1, 20), subVPSDE(0.1, 20), VESDE(0.01, 50): (mean coefficient, std)
MARGINALS = {
    "vp": (
        [0.9467217922210693, 0.2811828851699829, 0.006571585778146982],
        [0.32205256819725037, 0.9596542119979858, 0.9999783635139465],
    ),
    "subvp": (
        [0.9467217922210693, 0.2811828851699829, 0.006571585778146982],
        [0.1037178635597229, 0.9209361672401428, 0.9999567866325378],
    ),
    "ve": ([1.0, 1.0, 1.0], [0.02343672886490822, 0.7071067690849304, 50.0]),
}
# VESDE(0.01, 50, N=10) at t = 5/9 (σ_5 = 1.1349675, σ_4 = 0.44054121), x = pattern((2, 1, 2, 2), seed=7, scale=3):
# LangevinCorrector(snr=0.16, n_steps=1).update_fn and ReverseDiffusionPredictor.update_fn, (x, x_mean)
CORRECTOR = (
    [
        3.725890636444092,
        -2.0386524200439453,
        -0.7978737950325012,
        3.4243860244750977,
        -4.333317279815674,
        3.266061782836914,
        -1.0683817863464355,
        -1.3221421241760254,
    ],
    [
        3.7522573471069336,
        -1.8054089546203613,
        -0.8820928931236267,
        3.212031841278076,
        -4.196426868438721,
        3.444462299346924,
        -1.2495216131210327,
        -1.4556137323379517,
    ],
)
PREDICTOR = (
    [
        1.1924371719360352,
        -1.7274295091629028,
        0.42512136697769165,
        2.4684746265411377,
        -1.896272897720337,
        0.14741086959838867,
        0.9363569021224976,
        0.6016544699668884,
    ],
    [
        1.3550786972045898,
        -0.2886791229248047,
        -0.0943801999092102,
        1.158578634262085,
        -1.0518717765808105,
        1.247866153717041,
        -0.18099534511566162,
        -0.22165870666503906,
    ],
)


def test_marginals_match_score_sde():
    """σ(t) = std/mean of each SDE's perturbation kernel, and t(σ) inverts it."""
    for name, fn in (("vp", paths.vp_sigma), ("subvp", paths.subvp_sigma)):
        mean, std = (torch.tensor(v, dtype=torch.float64) for v in MARGINALS[name])
        sigma = fn(T, 0.1, 19.9)
        torch.testing.assert_close(sigma, std / mean, rtol=2e-6, atol=0, msg=name)
        inverse = paths.subvp_time if name == "subvp" else paths.vp_time
        torch.testing.assert_close(inverse(sigma, 0.1, 19.9), T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(paths.ve_sigma(T, 0.01, 50.0), torch.tensor(MARGINALS["ve"][1], dtype=torch.float64))


def score(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The pinned script's score function at σ."""
    return -(x - MU) / (STD**2 + sigma**2) + 0.1 * torch.sin(2 * x) / (1 + sigma)


def pc_sampler(**kwargs) -> PredictorCorrectorSampler:
    """score_sde's VESDE(0.01, 50, N=10): our levels are its discrete σ, descending (level i = its index 9 − i)."""
    process = SigmaProcess("ve", sigma_min=0.01, sigma_max=50.0)
    return PredictorCorrectorSampler(process, parameterization="x0", steps=10, sigma_schedule="model", **kwargs)


def test_pc_levels_are_score_sdes_discrete_sigmas():
    sampler = pc_sampler()
    reference = torch.exp(torch.linspace(torch.tensor(0.01).log(), torch.tensor(50.0).log(), 10)).flip(0)
    torch.testing.assert_close(sampler.sigmas[:-1].float(), reference, rtol=1e-6, atol=0)


def test_reverse_diffusion_predictor_and_langevin_corrector_match_score_sde():
    sampler = pc_sampler(snr=0.16, corrector_steps=1)
    x = pattern((2, 1, 2, 2), seed=7, scale=3.0)
    sigma = sampler.levels[4].sigma  # score_sde's σ_5
    sampler.noise = lambda like, generator: pattern(tuple(like.shape), seed=101)  # the script's first draw
    mean, noisy = sampler.correct(x, score(x, sigma), None)
    torch.testing.assert_close(noisy.flatten(), torch.tensor(CORRECTOR[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.flatten(), torch.tensor(CORRECTOR[1]), rtol=1e-5, atol=1e-5)
    x0 = x + sigma**2 * score(x, sigma)  # Tweedie: what a model outputs there
    noisy = sampler.predict(4, x, x0, score(x, sigma), None, last=False)
    torch.testing.assert_close(noisy.flatten(), torch.tensor(PREDICTOR[0]), rtol=1e-5, atol=1e-5)
    sampler.denoise = True
    mean = sampler.predict(4, x, x0, score(x, sigma), None, last=True)  # the mean alone
    torch.testing.assert_close(mean.flatten(), torch.tensor(PREDICTOR[1]), rtol=1e-5, atol=1e-5)


def test_the_chain_applies_them_in_score_sdes_order():
    """Through the sampler contract: corrector then predictor at each level (score_sde's ``pc_sampler`` loop), the
    model's output converted to the score by Tweedie's formula."""
    sampler = pc_sampler(snr=0.16, corrector_steps=1)
    sampler.noise = lambda like, generator: pattern(tuple(like.shape), seed=101)
    x = pattern((2, 1, 2, 2), seed=7, scale=3.0)
    outputs = []
    for t in sampler.timesteps.tolist():
        sigma = float(t)
        outputs.append(sampler.step(x + sigma**2 * score(x, sigma), t, x).prev_sample)
    assert len(outputs) == 20 and sampler.timesteps[8] == sampler.timesteps[9]
    torch.testing.assert_close(outputs[8].flatten(), torch.tensor(CORRECTOR[0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[9].flatten(), torch.tensor(PREDICTOR[0]), rtol=1e-5, atol=1e-5)

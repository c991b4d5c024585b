"""Classifier guidance against openai/guided-diffusion's formulas (Dhariwal & Nichol 2021), recomputed here in
float64 (no code of theirs is used or committed).

How the reference is computed (guided_diffusion/gaussian_diffusion.py, commit 169a6e8):
- ``cond_fn(x, t, y)`` (scripts/classifier_sample.py) = ∇_x log_softmax(classifier(x, t))[y] · classifier_scale; here
  the classifier is :class:`GaussianClasses`, whose gradient is closed-form, evaluated in float64.
- ``condition_score``: ε = _predict_eps_from_xstart(x, t, pred_xstart) − sqrt(1 − ᾱ_t) · cond_fn; pred_xstart =
  _predict_xstart_from_eps(x, t, ε); mean = q_posterior_mean(pred_xstart, x_t). ``ddim_sample`` (η = 0) then steps
  to pred_xstart sqrt(ᾱ_prev) + sqrt(1 − ᾱ_prev) ε.
- ``condition_mean`` (their ``p_sample``): mean + Σ_t · cond_fn, with Σ_t the model variance.
difflab applies the score form for every sampler (one wrapper of the model function); for the ancestral sampler
that shifts the mean by s β_t / sqrt(1 − β_t) ∇ log p, i.e. ``condition_mean``'s with Σ_t = β_t (fixed_large)
times 1/sqrt(1 − β_t): the last test pins that relation.
"""

from __future__ import annotations

import pytest
import torch

from difflab.samplers import DDIMSampler
from difflab.samplers.classifier_guidance import classifier_guidance
from difflab.schedules import GaussianDiffusion, Parameterization, VarianceType
from tests.parity.analytic import AnalyticModel, GaussianClasses, pattern

SCALE = 3.0
Y = torch.tensor([2, 0])


@pytest.fixture(scope="module")
def setup():
    diffusion = GaussianDiffusion("linear", num_timesteps=1000)
    means = 0.5 * pattern((3, 1, 4, 4), seed=4)
    return diffusion, AnalyticModel(diffusion.alphas_cumprod_64, "eps"), GaussianClasses(diffusion, means)


def reference(diffusion, model, classifier, x, t):
    """guided-diffusion's condition_score + ddim_sample (η = 0) in float64: (pred_xstart, ε, posterior mean, x_prev)."""
    ab = diffusion.alphas_cumprod_64[t]
    ab_prev = diffusion.alphas_cumprod_64[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
    xd = x.double()
    # cond_fn in float64: the closed-form gradient of GaussianClasses (α, v from the float64 table)
    means = classifier.means.double()
    var = ab * classifier.tau**2 + (1 - ab)
    logits = -(xd[:, None] - ab.sqrt() * means[None]).pow(2).flatten(2).sum(-1) / (2 * var)
    p = logits.softmax(dim=1)
    grad = ab.sqrt() / var * (means[Y] - torch.einsum("bk,kchw->bchw", p, means))
    cond = SCALE * grad
    # p_mean_variance of an ε model, then condition_score
    pred_xstart = (1 / ab).sqrt() * xd - (1 / ab - 1).sqrt() * model.eps(x, t)
    eps = ((1 / ab).sqrt() * xd - pred_xstart) / (1 / ab - 1).sqrt()
    eps = eps - (1 - ab).sqrt() * cond
    pred_xstart = (1 / ab).sqrt() * xd - (1 / ab - 1).sqrt() * eps
    beta = 1 - ab / ab_prev
    mean = ab_prev.sqrt() * beta / (1 - ab) * pred_xstart + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab) * xd
    x_prev = pred_xstart * ab_prev.sqrt() + (1 - ab_prev).sqrt() * eps
    return pred_xstart, eps, mean, x_prev, grad


@pytest.mark.parametrize("t", [999, 600, 150, 20, 1])
def test_condition_score_and_ddim_step(setup, t):
    diffusion, model, classifier = setup
    x = pattern((2, 1, 4, 4), seed=3)
    t_batch = torch.full((2,), t)
    guided = classifier_guidance(model, classifier, Y, SCALE, diffusion, Parameterization.EPS)(x, t_batch)
    pred_xstart, eps, mean, x_prev, _ = reference(diffusion, model, classifier, x, t)
    torch.testing.assert_close(guided.double(), eps, rtol=1e-5, atol=1e-5)
    ours = diffusion.p_mean_variance(Parameterization.EPS, VarianceType.FIXED_SMALL, guided, x, t_batch)
    atol = 1e-5 * float((1 / diffusion.alphas_cumprod_64[t] - 1).sqrt()) + 1e-5  # x̂_0 = x/α − σ ε̂ amplifies by σ
    torch.testing.assert_close(ours["pred_x0"].double(), pred_xstart, rtol=1e-5, atol=atol)
    torch.testing.assert_close(ours["mean"].double(), mean, rtol=1e-5, atol=1e-5)
    sampler = DDIMSampler(diffusion, steps=1000, eta=0.0, clip_denoised=False)
    sampler.set_timesteps(None)
    step = sampler.step(guided, t, x).prev_sample
    torch.testing.assert_close(step.double(), x_prev, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [999, 300, 5])
def test_score_form_is_condition_mean_with_beta_over_sqrt_alpha(setup, t):
    """Ancestral mean shift of the score form = condition_mean's shift with Σ = β_t (fixed_large), / sqrt(1 − β_t)."""
    diffusion, model, classifier = setup
    x = pattern((2, 1, 4, 4), seed=5)
    t_batch = torch.full((2,), t)
    guided = classifier_guidance(model, classifier, Y, SCALE, diffusion, Parameterization.EPS)(x, t_batch)
    mean = lambda out: diffusion.p_mean_variance(  # noqa: E731
        Parameterization.EPS, VarianceType.FIXED_LARGE, out, x, t_batch
    )
    plain, shifted = mean(model(x, t_batch)), mean(guided)
    grad = reference(diffusion, model, classifier, x, t)[-1]
    variance = plain["log_variance"].double().exp()  # Σ_t = β_t for t ≥ 1 (fixed_large)
    condition_mean_shift = variance * SCALE * grad
    beta = diffusion.betas[t].double()
    torch.testing.assert_close(
        (shifted["mean"] - plain["mean"]).double(), condition_mean_shift / (1 - beta).sqrt(), rtol=1e-4, atol=1e-6
    )

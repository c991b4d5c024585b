"""Classifier guidance (samplers/classifier_guidance.py) on an analytic classifier: Gaussian classes with known means,
whose p(y | x_t, t) and its gradient are closed-form, so the guided ε̂ / x̂_0 / mean are checked exactly."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from difflab.samplers import AncestralSampler, DDIMSampler, sample_loop
from difflab.samplers.classifier_guidance import ClassifierGuidance, class_log_prob_grad, classifier_guidance
from difflab.schedules import GaussianDiffusion, Parameterization, x0_eps_from_output
from tests.conftest import CONF_DIR, perturb_weights, tiny_diffusion_module
from tests.parity.analytic import GaussianClasses

TAU = 0.4  # GaussianClasses' per-pixel std of each class around its mean


def exact_eps(diffusion: GaussianDiffusion, parameterization: Parameterization = Parameterization.EPS):
    """The exact network output for N(0, I) data at any (fractional) t: ε̂ = s_t x_t, x̂_0 = α_t x_t; as ε, x0 or v."""

    def net(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        level = diffusion.noise_level(t, x)
        eps, x0 = level.std * x, level.alpha * x
        return {"eps": eps, "x0": x0, "v": level.alpha * eps - level.std * x0}[parameterization.value]

    return net


@pytest.fixture
def setup():
    diffusion = GaussianDiffusion("cosine", num_timesteps=100)
    generator = torch.Generator().manual_seed(0)
    means = torch.randn(3, 1, 4, 4, generator=generator)
    x = torch.randn(4, 1, 4, 4, generator=generator)
    return diffusion, GaussianClasses(diffusion, means), x, torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("t", [torch.tensor([0, 10, 50, 99]), torch.tensor([0.25, 10.5, 49.9, 98.7])])
def test_autograd_gradient_is_the_closed_form(setup, t):
    _, classifier, x, y = setup
    torch.testing.assert_close(class_log_prob_grad(classifier, x, t, y), classifier.grad(x, t, y))


@pytest.mark.parametrize("parameterization", list(Parameterization))
@pytest.mark.parametrize("t", [torch.tensor([3, 20, 60, 90]), torch.tensor([3.5, 20.25, 60.75, 89.1])])
def test_guided_eps_and_x0_move_by_the_closed_form_amount(setup, parameterization, t):
    """ε̂' = ε̂ − s sqrt(1 − ᾱ_t) ∇log p(y | x_t), hence x̂_0' = x̂_0 + s (1 − ᾱ_t)/sqrt(ᾱ_t) ∇log p, for ε, x0 and v
    models alike, at fractional t with ᾱ_t of log-σ interpolation."""
    diffusion, classifier, x, y = setup
    scale = 2.5
    net = exact_eps(diffusion, parameterization)
    guided = classifier_guidance(lambda x_t, t_: net(x_t, t_), classifier, y, scale, diffusion, parameterization)
    level = diffusion.noise_level(t, x)
    x0, eps = x0_eps_from_output(parameterization, net(x, t), x, level)
    x0_g, eps_g = x0_eps_from_output(parameterization, guided(x, t), x, level)
    grad = classifier.grad(x, t, y)
    # sqrt(1 − ᾱ) from σ_t directly: log σ interpolated between the table's neighbours
    sigmas = diffusion.continuous.sigmas
    lo = t.floor().long().clamp(max=diffusion.num_timesteps - 2)
    sigma = torch.exp((1 - (t - lo)) * sigmas[lo].log() + (t - lo) * sigmas[lo + 1].log()).float()
    std, alpha = (sigma / (1 + sigma**2).sqrt()).reshape(-1, 1, 1, 1), (1 + sigma**2).rsqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(eps_g - eps, -scale * std * grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x0_g - x0, scale * std**2 / alpha * grad, rtol=1e-4, atol=1e-4)


def test_sign_towards_the_class_mean():
    """Two classes at ±m, x_t halfway: the gradient points from x_t to the requested class (p = ½ each), so x̂_0
    moves towards μ_y by s (1 − ᾱ_t)/sqrt(ᾱ_t) · (sqrt(ᾱ_t)/v_t) μ_y exactly."""
    diffusion = GaussianDiffusion("linear", num_timesteps=100)
    m = torch.full((1, 2, 2), 0.8)
    classifier = GaussianClasses(diffusion, torch.stack([m, -m]))
    x, t, scale = torch.zeros(2, 1, 2, 2), torch.tensor([40, 40]), 3.0
    guided = classifier_guidance(exact_eps(diffusion), classifier, torch.tensor([0, 1]), scale, diffusion, "eps")
    x0 = diffusion.predict_x0_from_eps(x, t, guided(x, t))
    ab = diffusion.alphas_cumprod_64[40]
    expected = scale * (1 - ab) / ab.sqrt() * ab.sqrt() / (ab * TAU**2 + 1 - ab) * 0.8
    torch.testing.assert_close(x0[0], torch.full_like(x0[0], float(expected)))
    torch.testing.assert_close(x0[1], torch.full_like(x0[1], -float(expected)))


def test_ancestral_mean_shift_is_s_beta_over_sqrt_alpha_times_the_gradient(setup):
    """DDPM step with the same noise: x_{t−1}' − x_{t−1} = s β_t / sqrt(1 − β_t) ∇log p (no clipping)."""
    diffusion, classifier, x, y = setup
    sampler = AncestralSampler(diffusion, clip_denoised=False)
    sampler.set_timesteps(None)
    t, scale = 30, 1.5
    t_batch = torch.full((4,), t)
    guided = classifier_guidance(exact_eps(diffusion), classifier, y, scale, diffusion, Parameterization.EPS)
    step = lambda out: sampler.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample  # noqa: E731
    shift = step(guided(x, t_batch)) - step(exact_eps(diffusion)(x, t_batch))
    beta = diffusion.betas[t]
    torch.testing.assert_close(shift, scale * beta / (1 - beta).sqrt() * classifier.grad(x, t_batch, y))


def test_learned_variance_channels_pass_through_and_scale_zero_is_identity(setup):
    diffusion, classifier, x, y = setup
    t = torch.tensor([5, 6, 7, 8])
    output = torch.cat([exact_eps(diffusion)(x, t), torch.tanh(x)], dim=1)
    guided = classifier_guidance(lambda *_: output, classifier, y, 4.0, diffusion, Parameterization.EPS, 1)(x, t)
    torch.testing.assert_close(guided[:, 1:], output[:, 1:], rtol=0, atol=0)
    assert not torch.allclose(guided[:, :1], output[:, :1])
    same = classifier_guidance(lambda *_: output, classifier, y, 0.0, diffusion, Parameterization.EPS, 1)(x, t)
    assert same is output


def test_errors():
    diffusion = GaussianDiffusion(num_timesteps=10)
    with pytest.raises(ValueError, match="classifier_scale"):
        classifier_guidance(lambda x, t: x, lambda x, t: x, torch.zeros(1), -1.0, diffusion, Parameterization.EPS)
    with pytest.raises(ValueError, match="labels"):
        ClassifierGuidance(lambda x, t: x, 1.0, 3).wrap(lambda x, t: x, None, diffusion, Parameterization.EPS)
    classifier = GaussianClasses(diffusion, torch.zeros(2, 1, 2, 2))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        class_log_prob_grad(classifier, torch.zeros(1, 1, 2, 2), torch.tensor([3]), torch.tensor([0]))


def test_combines_with_classifier_free_guidance():
    """With a CFG model, the classifier's term is applied to the CFG-combined ε̂: (1 + w) ε_c − w ε_∅ − s·s_t·∇."""
    module = tiny_diffusion_module(num_timesteps=50, num_classes=3)
    perturb_weights(module)  # off the zero-initialised output layer: the class must change ε̂ for CFG to be seen
    classifier = GaussianClasses(module.diffusion, torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10, 25, 49]), torch.tensor([0, 1, 2])
    w, scale = 2.0, 1.5
    with torch.no_grad():
        cfg_only = module.model_fn(y, w)(x, t)
        module.classifier_guidance = ClassifierGuidance(classifier, scale, 3)
        both = module.model_fn(y, w)(x, t)
        cond, uncond = module(x, t, y), module(x, t, torch.full_like(y, 3))
    std = module.diffusion.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1, 1, 1)
    assert (cond - uncond).abs().max() > 0.01  # else every combination of the two is the same output
    torch.testing.assert_close(cfg_only, (1 + w) * cond - w * uncond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both, cfg_only - scale * std * classifier.grad(x, t, y), rtol=1e-5, atol=1e-5)


SAMPLERS = ["ddpm", "ddim", "euler", "heun", "euler_ancestral", "euler_maruyama", "dpmpp_2m", "dpmpp_3m"]
SAMPLERS += ["dpmpp_2m_sde", "unipc"]


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_moves_samples_towards_the_class(name):
    """A DiffusionModule whose net is the exact ε of N(0, I) data, guided towards one of two classes at ±m: with the
    same noise, guided samples land closer to μ_y and the analytic classifier's p(y | x_0) rises, for every sampler
    of conf/sampler/ (the solvers pass fractional t to the net and the classifier alike)."""
    module = tiny_diffusion_module(num_timesteps=50)
    module.net = _Net(exact_eps(module.diffusion))
    m = torch.full((1, 8, 8), 0.7)
    classifier = GaussianClasses(module.diffusion, torch.stack([m, -m]))
    cfg = OmegaConf.load(CONF_DIR / "sampler" / f"{name}.yaml")
    cfg.steps = 8
    sampler = module.build_sampler(instantiate(cfg))
    y = torch.tensor([0, 1] * 8)

    def draw(scale: float) -> torch.Tensor:
        module.classifier_guidance = ClassifierGuidance(classifier, scale, 2)
        return module.sample(16, torch.Generator().manual_seed(0), sampler, y=y)

    plain, guided = draw(0.0), draw(3.0)
    sign = (1 - 2 * y).float().reshape(-1, 1, 1, 1)  # +1 for class 0 (mean +m), −1 for class 1
    toward = lambda images: (images * sign).mean().item()  # noqa: E731
    assert toward(guided) > toward(plain) + 0.05
    p = lambda images: classifier(images, torch.zeros(16, dtype=torch.long)).softmax(1)[range(16), y].mean()  # noqa: E731
    assert p(guided) > p(plain)


class _Net(torch.nn.Module):
    """A function as the module's network (``DiffusionModule.net`` must be a Module)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, y=None):
        return self.fn(x, t, y)


def spied_guidance(diffusion: GaussianDiffusion, label: int):
    """A guided exact-ε model function recording the timesteps the net and the classifier see: (fn, net's, clf's)."""
    seen_net, seen_classifier = [], []
    classifier = GaussianClasses(diffusion, torch.zeros(2, 1, 2, 2))
    spy = lambda x, t: seen_classifier.append(t.tolist()) or classifier(x, t)  # noqa: E731
    net = exact_eps(diffusion)
    model_fn = lambda x, t: seen_net.append(t.tolist()) or net(x, t)  # noqa: E731
    guided = classifier_guidance(model_fn, spy, torch.tensor([label]), 1.0, diffusion, Parameterization.EPS)
    return guided, seen_net, seen_classifier


def test_respaced_ddim_gives_the_classifier_the_models_timesteps():
    """The classifier sees the original timesteps the net sees (respaced DDIM), not the step index."""
    diffusion = GaussianDiffusion(num_timesteps=40)
    guided, seen_net, seen_classifier = spied_guidance(diffusion, 0)
    sample_loop(guided, DDIMSampler(diffusion, steps=5, eta=0.0), (1, 1, 2, 2), torch.Generator().manual_seed(0))
    assert seen_net == seen_classifier and len(seen_net) == 5 and seen_net[0] == [39]


def test_fractional_timesteps_reach_net_and_classifier_equally():
    diffusion = GaussianDiffusion(num_timesteps=40)
    guided, seen_net, seen_classifier = spied_guidance(diffusion, 1)
    cfg = OmegaConf.load(CONF_DIR / "sampler" / "dpmpp_2m.yaml")
    cfg.steps = 6
    sampler = instantiate(cfg)(diffusion=diffusion, parameterization="eps", model_variance_type="fixed_small")
    x = sample_loop(guided, sampler, (1, 1, 2, 2), torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert seen_net == seen_classifier
    assert any(not math.isclose(v[0], round(v[0])) for v in seen_net)  # Karras σ fall between the model's steps

"""Classifier guidance (Dhariwal & Nichol 2021, ADM-G; survey Method 5.11) as a wrapper of the model function, so
every sampler (ancestral, DDIM, the ODE/SDE solvers) gets it: they all call one ``model_fn(x_t, t)``.

With a noise-conditional classifier p_φ(y | x_t, t) and scale s, the guided noise prediction is (ADM's Algorithm 2,
guided-diffusion's ``condition_score``)

    ε̂' = ε̂ − s · sqrt(1 − ᾱ_t) · ∇_{x_t} log p_φ(y | x_t, t),

i.e. the score ∇ log p_t(x_t) = −ε̂/sqrt(1 − ᾱ_t) plus s times the classifier's: sampling p(x) p(y | x)^s. For the
ancestral sampler this moves the mean by s · β_t/sqrt(α_t) · ∇ log p_φ, which ADM's ``condition_mean`` (Algorithm 1)
writes as s · Σ_t · ∇ log p_φ: the same to first order in β_t (pinned in tests/parity/test_classifier_guidance.py);
the ε form is the one that every sampler shares. An ε/x0/v output is converted to ε̂ and back through
:func:`difflab.schedules.x0_eps_from_output` / :func:`difflab.schedules.output_from_x0_eps`; with a learned variance
only the mean channels are guided. Fractional timesteps (the solvers' σ steps between the model's) reach the
classifier as they reach the network, and sqrt(1 − ᾱ_t) is taken at that t (log-σ interpolation, as the solvers).
Composed after classifier-free guidance it guides the CFG-combined ε̂.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from difflab.schedules import GaussianDiffusion, Parameterization, output_from_x0_eps, x0_eps_from_output
from difflab.utils.enums import parse_enum

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ClassifierFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B, C, H, W), t (B,)) → logits (B, K)


def class_log_prob_grad(classifier: ClassifierFn, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_{x_t} log p_φ(y | x_t, t), (B, C, H, W) in fp32 (guided-diffusion's ``cond_fn`` before its scale).

    Runs under ``torch.enable_grad`` so it works inside the samplers' ``no_grad``; examples are independent (the
    classifier must not mix them, e.g. through BatchNorm in training mode), so the gradient of the summed
    log-probabilities is each example's own.
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "classifier guidance needs autograd for ∇_x log p(y | x_t): sample under torch.no_grad(), "
            "not torch.inference_mode()"
        )
    with torch.enable_grad():
        x_in = x_t.detach().float().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t).float(), dim=-1)
        selected = log_probs.gather(1, y.to(log_probs.device).long().reshape(-1, 1))
        return torch.autograd.grad(selected.sum(), x_in)[0]


def classifier_guidance(
    model_fn: ModelFn,
    classifier: ClassifierFn,
    y: torch.Tensor,
    scale: float,
    diffusion: GaussianDiffusion,
    parameterization: str | Parameterization,
    mean_channels: int | None = None,
) -> ModelFn:
    """Return ``fn(x_t, t)``: ``model_fn``'s output with its ε̂ guided towards classes ``y`` (B,) by ``scale`` = s.

    ``model_fn`` returns the raw network output in ``parameterization`` (C or, with a learned variance, 2C channels,
    of which the first ``mean_channels`` are guided); ``classifier(x_t, t)`` gives logits for the same x_t and t
    as the network. s = 0 returns the model's output unchanged.
    """
    if scale < 0:
        raise ValueError(f"classifier_scale={scale}: expected >= 0 (0 = no classifier guidance)")
    parameterization = parse_enum(Parameterization, parameterization, "parameterization")

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = model_fn(x_t, t)
        if scale == 0:
            return output
        channels = mean_channels or output.shape[1]
        level = diffusion.noise_level(t, x_t)
        x_t32 = x_t.float()
        _, eps = x0_eps_from_output(parameterization, output[:, :channels].float(), x_t32, level)
        eps = eps - scale * level.std * class_log_prob_grad(classifier, x_t, t, y)
        x0 = x0_eps_from_output(Parameterization.EPS, eps, x_t32, level)[0]
        mean = output_from_x0_eps(parameterization, x0, eps, level).to(output.dtype)
        return torch.cat([mean, output[:, channels:]], dim=1)

    return guided


@dataclass
class ClassifierGuidance:
    """A noise-conditional classifier and its scale s, as a diffusion module holds them for sampling
    (``DiffusionModule.classifier_guidance``; set by ``sample.py classifier_ckpt=... classifier_scale=...``)."""

    classifier: ClassifierFn
    scale: float
    num_classes: int

    def wrap(
        self,
        model_fn: ModelFn,
        y: torch.Tensor | None,
        diffusion: GaussianDiffusion,
        parameterization: Parameterization,
        mean_channels: int | None = None,
    ) -> ModelFn:
        if y is None:
            raise ValueError("classifier guidance needs class labels y to guide towards")
        return classifier_guidance(model_fn, self.classifier, y, self.scale, diffusion, parameterization, mean_channels)

"""``sample.py``/``eval.py`` ``classifier_ckpt=... classifier_scale=s``: load a noise-conditional classifier
(``python src/train.py experiment=noisy_classifier_fmnist``), check it fits the diffusion checkpoint, and attach it
to the module for sampling (see :mod:`difflab.samplers.classifier_guidance`)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig

from difflab.modules import DiffusionModule, LatentDiffusionModule, NoisyClassifierModule, load_module
from difflab.samplers.classifier_guidance import ClassifierGuidance

log = logging.getLogger(__name__)

DEFAULT_SCALE = 1.0  # ADM-G's s for its class-conditional ImageNet 256 model


def load_noisy_classifier(path: str, device: torch.device | str = "cpu") -> NoisyClassifierModule:
    """The :class:`NoisyClassifierModule` of checkpoint ``path`` in eval mode, weights frozen."""
    classifier, _ = load_module(path, map_location=device, key="classifier_ckpt")
    if not isinstance(classifier, NoisyClassifierModule):
        raise ValueError(
            f"classifier_ckpt={path!r}: a {type(classifier).__name__} checkpoint; classifier guidance needs a "
            "noise-conditional classifier (python src/train.py experiment=noisy_classifier_fmnist)"
        )
    return classifier.requires_grad_(False).eval()


def check_compatible(classifier: NoisyClassifierModule, module: DiffusionModule, path: str) -> None:
    """Clear errors when the classifier cannot guide ``module``: latent model, class count, image shape, schedule."""
    where = f"classifier_ckpt={path!r}"
    if isinstance(module, LatentDiffusionModule):
        raise ValueError(
            f"{where}: classifier guidance is supported for pixel-space diffusion only; a latent diffusion model "
            "would need a classifier of noisy latents (not built): use classifier-free guidance (guidance_scale=)"
        )
    process = getattr(module.diffusion, "process_kind", "gaussian")
    if process != "gaussian":
        raise ValueError(
            f"{where}: the noisy classifier is trained on a discrete Gaussian diffusion's x_t; this checkpoint is a "
            f"{process} process ({type(module.diffusion).__name__}): use classifier-free guidance (guidance_scale=)"
        )
    if module.num_classes and module.num_classes != classifier.num_classes:
        raise ValueError(
            f"{where}: the classifier has {classifier.num_classes} classes, the diffusion checkpoint's model "
            f"{module.num_classes}: train the classifier on the same data"
        )
    if tuple(classifier.image_shape) != tuple(module.image_shape):
        raise ValueError(
            f"{where}: the classifier takes images of shape {list(classifier.image_shape)} (C, H, W), the diffusion "
            f"model makes {list(module.image_shape)}: train it with the same data.image_size (and channels)"
        )
    ours, theirs = classifier.diffusion, module.diffusion
    if ours.num_timesteps != theirs.num_timesteps:
        raise ValueError(
            f"{where}: the classifier was trained on a schedule of T={ours.num_timesteps} steps, the diffusion "
            f"model has T={theirs.num_timesteps}: train it with the model's schedule (schedule=... "
            "schedule.num_timesteps=...)"
        )
    if not torch.allclose(ours.alphas_cumprod.cpu(), theirs.alphas_cumprod.cpu(), rtol=1e-5, atol=1e-7):
        raise ValueError(
            f"{where}: the classifier's noise schedule ({ours.beta_schedule.value}) differs from the diffusion "
            f"model's ({theirs.beta_schedule.value}): its x_t would not be the model's; train it with schedule= as "
            "the model"
        )


def attach_classifier(cfg: DictConfig, module: DiffusionModule, device: torch.device) -> None:
    """Set ``module.classifier_guidance`` from ``cfg.classifier_ckpt`` / ``cfg.classifier_scale`` (keys absent or
    null: nothing to do; a scale without a classifier is an error)."""
    path, scale = cfg.get("classifier_ckpt"), cfg.get("classifier_scale")
    if path is None:
        if scale is not None:
            what = "a class-conditional" if module.conditional else "an unconditional"
            raise ValueError(
                f"classifier_scale={scale} without classifier_ckpt: {what} model has no classifier to guide with; "
                "pass classifier_ckpt=<noisy classifier checkpoint> (python src/train.py "
                "experiment=noisy_classifier_fmnist)" + (", or use guidance_scale= (CFG)" if module.conditional else "")
            )
        return
    if cfg.get("mode", "generate") != "generate":
        raise ValueError(f"classifier_ckpt with mode={cfg.mode}: classifier guidance applies to mode=generate only")
    scale = DEFAULT_SCALE if scale is None else float(scale)
    if scale < 0:
        raise ValueError(f"classifier_scale={scale}: expected >= 0 (0 = no classifier guidance)")
    classifier = load_noisy_classifier(str(path), device)
    check_compatible(classifier, module, str(path))
    module.classifier_guidance = ClassifierGuidance(classifier, scale, classifier.num_classes)
    log.info("Classifier guidance: s=%g with %s (%d classes)", scale, path, classifier.num_classes)


def guided_classes(module: Any) -> int | None:
    """The class count that labels are drawn for: the model's, else the guiding classifier's (None: neither)."""
    guidance = getattr(module, "classifier_guidance", None)
    return module.num_classes or (guidance.num_classes if guidance is not None else None)

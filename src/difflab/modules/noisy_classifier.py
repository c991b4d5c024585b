"""NoisyClassifierModule: the noise-conditional classifier p_φ(y | x_t, t) of classifier guidance (Dhariwal & Nichol
2021, §4), trained with cross-entropy on x_t = q_sample(x_0, t, ε) at uniform t of a diffusion schedule."""

from __future__ import annotations

from typing import Any

import torch

from difflab.modules.classifier import ClassifierModule
from difflab.schedules import GaussianDiffusion


class NoisyClassifierModule(ClassifierModule):
    """A :class:`ClassifierModule` whose net takes ``(x_t, t)`` (``ClassifierNet(time_embed_dim=...)``).

    Args (keywords; the others are ClassifierModule's):
        schedule: the :class:`GaussianDiffusion` of the diffusion models it will guide (β schedule and T must
            match theirs: ``sample.py classifier_ckpt=...`` checks ᾱ).

    Training draws t ~ U{0, …, T−1} and ε ~ N(0, I) per example. Validation and test
    draw them from a generator seeded by the batch index, so the logged ``val/acc`` is the accuracy averaged over
    noise levels on the same draws every time; ``val/acc_clean`` is the accuracy at t = 0.
    """

    def __init__(self, schedule: GaussianDiffusion, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if getattr(self.net, "time_embed_dim", None) is None:
            raise ValueError(
                "model.net: the noisy classifier needs a timestep input (ClassifierNet with net.time_embed_dim set)"
            )
        self.diffusion = schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of x_t (B, C, H, W) at timesteps t (B,) (long, or float between steps)."""
        return self.net(x_t, t)

    def batch_logits(self, x: torch.Tensor, stage: str, batch_idx: int) -> torch.Tensor:
        """Logits of x_t = q_sample(x, t, ε): t, ε drawn freely in training, seeded by the batch index otherwise."""
        generator = None if stage == "train" else torch.Generator(device=x.device).manual_seed(batch_idx)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self(self.diffusion.q_sample(x, t, noise), t)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        x, y = batch
        clean = self(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        accuracy = (clean.argmax(dim=1) == y).float().mean()
        self.log("val/acc_clean", accuracy, on_epoch=True, sync_dist=True, batch_size=x.shape[0])

"""The stage-1 loss of latent diffusion (Esser et al. 2021 §3; Rombach et al. 2022 Appendix G):
reconstruction + perceptual + regulariser + an adaptively weighted PatchGAN hinge loss.

Scaling: reconstruction and perceptual terms are means over pixels; the KL term is the per-image KL divided by the
number of pixels, so ``kl_weight`` keeps LDM's meaning (LDM sums both over pixels: the same ratio).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.losses.perceptual import build_perceptual


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss ½ (E[relu(1 − D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4
) -> torch.Tensor:
    """λ = ||∇_L rec|| / (||∇_L g|| + 1e-4), clamped to [0, max_weight], detached (Esser et al. 2021, eq. 7).

    L is the decoder's last layer. The 1e-4 guards a zero generator gradient (λ stays finite).
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    """Generator and discriminator objectives of the autoencoder.

    Args:
        reconstruction: ``l1`` | ``l2``. perceptual: see :mod:`difflab.losses.perceptual`; perceptual_weight.
        kl_weight: weight of KL(q(z|x) || N(0, I)) (kl autoencoders; LDM: 1e-6).
        codebook_weight: weight of the VQ codebook + commitment loss (vq autoencoders).
        disc_weight: multiplies the adaptive weight λ of the generator's GAN term.
        disc_start: training batch from which the GAN terms are on (before: plain autoencoder).
    """

    def __init__(
        self,
        reconstruction: str = "l1",
        perceptual: str | None = "none",
        perceptual_weight: float = 1.0,
        kl_weight: float = 1e-6,
        codebook_weight: float = 1.0,
        disc_weight: float = 0.5,
        disc_start: int = 5000,
    ) -> None:
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"model.loss.reconstruction={reconstruction!r}: expected l1 or l2")
        for key, value in dict(
            perceptual_weight=perceptual_weight,
            kl_weight=kl_weight,
            codebook_weight=codebook_weight,
            disc_weight=disc_weight,
            disc_start=disc_start,
        ).items():
            if value < 0:
                raise ValueError(f"model.loss.{key}={value}: expected >= 0")
        self.reconstruction, self.perceptual_name = reconstruction, perceptual or "none"
        self.perceptual = build_perceptual(perceptual)
        self.perceptual_weight, self.kl_weight, self.codebook_weight = perceptual_weight, kl_weight, codebook_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start

    def gan_active(self, step: int) -> bool:
        return self.disc_weight > 0 and step >= self.disc_start

    def reconstruction_terms(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-image (B,) reconstruction (and perceptual) distances of x̂ to x."""
        diff = (x - x_hat).abs() if self.reconstruction == "l1" else (x - x_hat).pow(2)
        terms = {"rec": diff.float().mean(dim=(1, 2, 3))}
        if self.perceptual is not None and self.perceptual_weight > 0:
            terms[f"perceptual_{self.perceptual_name}"] = self.perceptual(x, x_hat)
        return terms

    def generator_loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        reg_loss: torch.Tensor,
        logits_fake: torch.Tensor | None,
        last_layer: torch.Tensor,
        step: int,
        kl: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total generator loss and its (detached) parts. ``reg_loss``: KL per image (B,) or the VQ loss."""
        terms = self.reconstruction_terms(x, x_hat)
        rec = terms["rec"].mean()
        for name, value in terms.items():
            if name.startswith("perceptual"):
                rec = rec + self.perceptual_weight * value.mean()
        pixels = x[0].numel()
        reg = self.kl_weight * reg_loss.mean() / pixels if kl else self.codebook_weight * reg_loss.mean()
        loss = rec + reg
        logs = {name: value.detach().mean() for name, value in terms.items()}
        logs["kl" if kl else "vq"] = reg_loss.detach().mean()
        if logits_fake is not None and self.gan_active(step):
            g_loss = -logits_fake.mean()
            weight = self.disc_weight * (adaptive_weight(rec, g_loss, last_layer) if torch.is_grad_enabled() else 1.0)
            loss = loss + weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=torch.as_tensor(weight).detach())
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return hinge_d_loss(logits_real, logits_fake)

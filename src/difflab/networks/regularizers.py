"""Latent regularisers of the latent-diffusion autoencoder (Rombach et al. 2022, §3 and Appendix G).

- ``kl``: a diagonal Gaussian posterior q(z|x) = N(μ, diag σ²) pulled weakly (weight ~1e-6) towards N(0, I).
- ``vq``: a codebook of ``n_embed`` vectors of size ``embed_dim`` (van den Oord et al. 2017, VQ-VAE), with the
  straight-through estimator and the loss ||sg[z_e] − e||² + β ||z_e − sg[e]||² (codebook + commitment).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from difflab.utils.enums import StrEnumChoice


class Regularizer(StrEnumChoice):
    KL = "kl"
    VQ = "vq"


class DiagonalGaussian:
    """q(z|x) from the encoder's moments (B, 2C, h, w) = [μ, log σ²]; log σ² clamped to [-30, 20] (LDM)."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.float().chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ ε (reparameterisation), (B, C, h, w)."""
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²), summed over (C, h, w): (B,) nats."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation of z_e (B, embed_dim, h, w).

    Returns (z_q with straight-through gradients (B, embed_dim, h, w), loss (scalar), info) where
    loss = ||sg[z_e] − z_q||² + β ||z_e − sg[z_q]||² (means over elements) and info holds ``indices`` (B, h, w),
    ``perplexity`` = exp(entropy of code usage in the batch) and ``usage`` = fraction of codes used.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, data_init: bool = True) -> None:
        super().__init__()
        if n_embed < 2 or embed_dim < 1:
            raise ValueError(
                f"autoencoder.n_embed={n_embed}, autoencoder.embed_dim={embed_dim}: "
                "expected n_embed >= 2 and embed_dim >= 1"
            )
        if beta < 0:
            raise ValueError(f"autoencoder.beta={beta}: expected >= 0")
        self.n_embed, self.embed_dim, self.beta = n_embed, embed_dim, beta
        self.codebook = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / n_embed, 1.0 / n_embed)
        # Data-dependent initialisation (as in Jukebox / k-means-initialised VQ): VQ-GAN's uniform(±1/n) codebook
        # sits far from the encoder outputs and collapses to a handful of codes (we saw 5 of 256 in use on
        # Fashion-MNIST). The first training batch seeds the codebook with encoder outputs instead; a loaded
        # state_dict (resume, stage-1 checkpoints) switches this off.
        self.needs_init = data_init

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self.needs_init = False

    @torch.no_grad()
    def init_from(self, z_e: torch.Tensor) -> None:
        """Set the codebook to ``n_embed`` random encoder outputs of the batch (the same on every DDP rank)."""
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, self.embed_dim).float()
        picks = torch.randint(len(flat), (self.n_embed,), device=flat.device)
        self.codebook.weight.copy_(flat[picks] + 1e-3 * torch.randn_like(flat[picks]))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.codebook.weight.data, src=0)
        self.needs_init = False

    def lookup(self, z_e: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) of the nearest codebook entries (squared Euclidean distance)."""
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, self.embed_dim).float()
        weight = self.codebook.weight.float()
        distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ weight.t() + weight.pow(2).sum(1)[None]
        b, _, h, w = z_e.shape
        return distances.argmin(dim=1).reshape(b, h, w)

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for indices (B, h, w) → (B, embed_dim, h, w)."""
        return self.codebook(indices).permute(0, 3, 1, 2)

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if self.training and self.needs_init:
            self.init_from(z_e)
        indices = self.lookup(z_e)
        z_q = self.embed(indices).to(z_e.dtype)
        loss = F.mse_loss(z_q, z_e.detach()) + self.beta * F.mse_loss(z_e, z_q.detach())
        z_q = z_e + (z_q - z_e).detach()  # straight-through: ∂z_q/∂z_e = I
        counts = torch.bincount(indices.flatten(), minlength=self.n_embed).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        info = {"indices": indices, "perplexity": perplexity, "usage": (counts > 0).float().mean()}
        return z_q, loss, info

"""The latent-diffusion autoencoder (Rombach et al. 2022, stage 1; Esser et al. 2021 architecture).

One configurable family: a convolutional encoder/decoder with downsampling factor f = 2^(len(ch_mult) − 1)
(f ∈ {2, 4, 8} for ch_mult of length 2, 3, 4) and ``embed_dim`` latent channels, regularised by ``kl`` or ``vq``
(see :mod:`difflab.networks.regularizers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from difflab.networks.blocks import AttentionBlock, Downsample, Upsample, group_norm
from difflab.networks.regularizers import DiagonalGaussian, Regularizer, VectorQuantizer
from difflab.utils.enums import parse_enum


class ResnetBlock(nn.Module):
    """GN → SiLU → conv → GN → SiLU → dropout → conv, plus a (1x1 when channels change) skip. (B, C_in, H, W) →
    (B, C_out, H, W). The autoencoder's block: like the UNet's ResBlock without a time embedding."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, num_groups: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            group_norm(in_channels, num_groups),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels, num_groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


def _mid(ch: int, attn: bool, dropout: float, num_groups: int) -> nn.Sequential:
    layers: list[nn.Module] = [ResnetBlock(ch, ch, dropout, num_groups)]
    if attn:
        layers.append(AttentionBlock(ch, 1, -1, num_groups))
    return nn.Sequential(*layers, ResnetBlock(ch, ch, dropout, num_groups))


def _head(ch: int, out: int, num_groups: int) -> nn.Sequential:
    return nn.Sequential(group_norm(ch, num_groups), nn.SiLU(), nn.Conv2d(ch, out, 3, padding=1))


class ConvStack(NamedTuple):
    """The shape of the encoder and decoder stacks (see :class:`Autoencoder`)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_mid: bool
    dropout: float
    num_groups: int


class Encoder(nn.Module):
    """x (B, in_channels, H, W) → (B, out_channels, H/f, W/f)."""

    def __init__(self, in_channels: int, out_channels: int, stack: ConvStack) -> None:
        super().__init__()
        ch, ch_mult, num_res_blocks, attn_mid, dropout, num_groups = stack
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        cur = ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResnetBlock(cur, ch * mult, dropout, num_groups))
                cur = ch * mult
            if level != len(ch_mult) - 1:
                layers.append(Downsample(cur))
        layers += [_mid(cur, attn_mid, dropout, num_groups), _head(cur, out_channels, num_groups)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    """z (B, in_channels, h, w) → (B, out_channels, h·f, w·f); ``conv_out`` is the last layer (adaptive GAN weight)."""

    def __init__(self, in_channels: int, out_channels: int, stack: ConvStack) -> None:
        super().__init__()
        ch, ch_mult, num_res_blocks, attn_mid, dropout, num_groups = stack
        cur = ch * ch_mult[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, cur, 3, padding=1), _mid(cur, attn_mid, dropout, num_groups)]
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                layers.append(ResnetBlock(cur, ch * mult, dropout, num_groups))
                cur = ch * mult
            if level:
                layers.append(Upsample(cur))
        layers += [group_norm(cur, num_groups), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.layers(z))


class Autoencoder(nn.Module):
    """Encoder → (quant_conv) → regulariser → (post_quant_conv) → Decoder.

    Args:
        in_channels: image channels; image_size: H = W of the images (must be divisible by f).
        regularizer: ``kl`` | ``vq``. embed_dim: latent channels (the diffusion model's input channels).
        z_channels: encoder output channels before the 1x1 ``quant_conv``.
        ch, ch_mult, num_res_blocks, attn_mid, dropout, num_groups: the conv stacks (f = 2^(len(ch_mult) − 1)).
        n_embed, beta: VQ codebook size and commitment weight β (``vq`` only).
    ``encode`` gives the latent the diffusion model sees: for ``kl`` a posterior sample (or its mean), for ``vq`` the
    pre-quantisation z_e — ``decode`` quantises it first, so the VQ layer is absorbed into the decoder (as in LDM).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        regularizer: str | Regularizer = Regularizer.KL,
        embed_dim: int = 4,
        z_channels: int = 4,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_mid: bool = True,
        dropout: float = 0.0,
        num_groups: int = 32,
        n_embed: int = 256,
        beta: float = 0.25,
    ) -> None:
        super().__init__()
        self.regularizer = parse_enum(Regularizer, regularizer, "autoencoder.regularizer")
        ch_mult = tuple(ch_mult)
        if not 2 <= len(ch_mult) <= 4 or min(ch_mult) < 1:
            raise ValueError(f"autoencoder.ch_mult={list(ch_mult)}: expected 2-4 positive entries (f = 2, 4 or 8)")
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        if image_size % self.downsample_factor:
            raise ValueError(
                f"image_size={image_size} is not divisible by the autoencoder's factor f={self.downsample_factor}"
            )
        if min(embed_dim, z_channels, ch, num_res_blocks) < 1:
            raise ValueError("autoencoder.embed_dim, .z_channels, .ch and .num_res_blocks must be >= 1")
        self.in_channels, self.image_size, self.embed_dim = in_channels, image_size, embed_dim
        kl = self.regularizer is Regularizer.KL
        stack = ConvStack(ch, ch_mult, num_res_blocks, attn_mid, dropout, num_groups)
        self.encoder = Encoder(in_channels, 2 * z_channels if kl else z_channels, stack)
        self.quant_conv = nn.Conv2d(2 * z_channels if kl else z_channels, 2 * embed_dim if kl else embed_dim, 1)
        self.quantizer = None if kl else VectorQuantizer(n_embed, embed_dim, beta)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(z_channels, in_channels, stack)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(embed_dim, H/f, W/f) of one latent."""
        size = self.image_size // self.downsample_factor
        return (self.embed_dim, size, size)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight: the adaptive GAN weight compares gradient norms there."""
        return self.decoder.conv_out.weight

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) of a ``kl`` autoencoder for x (B, C, H, W) in [-1, 1]."""
        if self.quantizer is not None:
            raise TypeError("posterior() exists for autoencoder.regularizer=kl only")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder gives before sampling: kl: [μ, log σ²] (B, 2·embed_dim, h, w); vq: z_e (B, embed_dim, h, w).
        Latent caches store this, so posterior samples stay fresh at every epoch."""
        return self.quant_conv(self.encoder(x))

    def latent_from_moments(
        self, moments: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The latent of :meth:`encode_moments`' output: a posterior sample (``sample``) or its mean (kl); z_e (vq)."""
        if self.quantizer is not None:
            return moments
        posterior = DiagonalGaussian(moments)
        return posterior.sample(generator) if sample else posterior.mode()

    def encode(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """The latent (B, embed_dim, H/f, W/f) of x: a posterior sample (``sample``) or mean (kl); z_e (vq)."""
        return self.latent_from_moments(self.encode_moments(x), sample, generator)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) from latents (vq: quantised first)."""
        if self.quantizer is not None:
            z = self.quantizer(z)[0]
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Reconstruction (B, C, H, W), the regulariser's loss and logs.

        kl: loss = KL (B,) per image (nats); vq: the codebook + commitment loss (scalar), info has
        ``perplexity``/``usage``.
        """
        if self.quantizer is None:
            posterior = self.posterior(x)
            z = posterior.sample() if sample_posterior else posterior.mode()
            return self.decoder(self.post_quant_conv(z)), posterior.kl(), {}
        z_q, loss, info = self.quantizer(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(z_q)), loss, info

"""One configurable ADM-style UNet (Ho et al. 2020 Appendix B; Dhariwal & Nichol 2021).

Presets live in ``conf/net/``: ``unet_s`` (tiny, for CPU) and ``unet_m`` (the DDPM CIFAR-10 shape).
Conditioning: ``num_classes`` adds a learned class embedding (index ``num_classes`` is the null class used by
classifier-free guidance) to the time embedding; ``context_dim`` replaces self-attention at
``attention_resolutions`` by spatial transformers that cross-attend to a context sequence (latent diffusion);
``guidance_embed`` makes the guidance scale w an input (LCM's w-conditioning, :class:`GuidanceEmbedding`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from difflab.networks.attention import SpatialTransformer
from difflab.networks.blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    run_block,
    zero_module,
)
from difflab.networks.embeddings import GuidanceEmbedding, add_guidance, timestep_embedding


class EmbedSequential(nn.Sequential):
    """A sequence of blocks where ``ResBlock``s also receive the embedding and ``SpatialTransformer``s the context."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """ε/x0/v-prediction UNet.

    Args:
        in_channels, out_channels: image channels in and out (out = 2·in for learned variances; set by the model).
        image_size: input height = width; must be divisible by 2^(len(channel_mult) − 1).
        model_channels: channels at the first level; level i has ``model_channels · channel_mult[i]``.
        num_res_blocks: residual blocks per level (the decoder has one more, ADM).
        attention_resolutions: spatial sizes (e.g. 16 for 16x16) at which self-attention follows each block.
        num_heads / num_head_channels: attention heads (num_head_channels > 0 overrides num_heads).
        dropout, num_groups, use_scale_shift_norm: see :class:`ResBlock`.
        checkpointing: activation checkpointing per block in training (recomputed in the backward pass).
        num_classes: if set, a class embedding (+1 null class) is added to the time embedding.
        context_dim: if set, attention layers become :class:`SpatialTransformer`s (self- and cross-attention to a
            context (B, L, context_dim)) of ``transformer_depth`` blocks; set by the model from its conditioner.
        guidance_embed: take the guidance scale w as an input (latent consistency models): its sinusoid of
            ``guidance_embed_dim`` features through a zero-initialised linear map, added to the timestep features
            (off by default: no parameters, the network and its state dict unchanged); set by the model.
    Shapes: x (B, in_channels, H, W), t (B,) long, y (B,) long or None, context (B, L, context_dim) with
    context_mask (B, L) bool (True = real token), w (B,) float or None (w = 0; only with guidance_embed)
    → (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        image_size: int,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        num_head_channels: int = -1,
        dropout: float = 0.0,
        num_groups: int = 32,
        use_scale_shift_norm: bool = True,
        num_classes: int | None = None,
        context_dim: int | None = None,
        transformer_depth: int = 1,
        checkpointing: bool = False,
        guidance_embed: bool = False,
        guidance_embed_dim: int = 256,
    ) -> None:
        super().__init__()
        self.checkpointing = bool(checkpointing)
        channel_mult = tuple(channel_mult)
        _validate(image_size, channel_mult, attention_resolutions, num_res_blocks, model_channels)
        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.model_channels, self.num_classes, self.context_dim = model_channels, num_classes, context_dim
        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.guidance_embed = GuidanceEmbedding(model_channels, guidance_embed_dim) if guidance_embed else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, use_scale_shift_norm, num_groups)

        def attn(ch: int) -> nn.Module:
            if context_dim:
                return SpatialTransformer(ch, num_heads, context_dim, transformer_depth, num_head_channels, num_groups)
            return AttentionBlock(ch, num_heads, num_head_channels, num_groups)

        attention_resolutions = set(attention_resolutions)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels, ch, resolution = [model_channels], model_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if resolution in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                resolution //= 2
        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if resolution in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    resolution *= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(
            group_norm(ch, num_groups), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1))
        )

    def embed(self, t: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor | None = None) -> torch.Tensor:
        """Time embedding (B, 4·model_channels) (of the timestep features plus w's with ``guidance_embed``), plus the
        class embedding when the net is class-conditional."""
        features = add_guidance(timestep_embedding(t, self.model_channels), self.guidance_embed, w)
        emb = self.time_embed(features)
        if self.class_embed is not None:
            if y is None:  # unconditional call of a conditional net: the null class
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            emb = emb + self.class_embed(y)
        return emb

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embed(t, y, w)
        h, skips = x, []
        for block in self.input_blocks:
            h = run_block(block, self.checkpointing, h, emb, context, context_mask)
            skips.append(h)
        h = run_block(self.middle_block, self.checkpointing, h, emb, context, context_mask)
        for block in self.output_blocks:
            h = run_block(block, self.checkpointing, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
        return self.out(h)

    def shard_units(self) -> list[nn.Module]:
        """The modules that FSDP shards as one unit each (gathered just before they run): every input, middle and
        output block (a resolution level holds ``num_res_blocks`` + 1 of them)."""
        return [*self.input_blocks, self.middle_block, *self.output_blocks]


def _validate(
    image_size: int,
    channel_mult: tuple[int, ...],
    attention_resolutions: Sequence[int],
    num_res_blocks: int,
    model_channels: int,
) -> None:
    """Fail at construction, naming the key, for shapes the UNet cannot take."""
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"net.channel_mult={list(channel_mult)}: expected a non-empty list of positive integers")
    if num_res_blocks < 1 or model_channels < 1:
        raise ValueError("net.num_res_blocks and net.model_channels must be >= 1")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size < factor or image_size % factor:
        raise ValueError(
            f"image_size={image_size}: the UNet with net.channel_mult={list(channel_mult)} downsamples "
            f"{len(channel_mult) - 1} times, so the image size must be a multiple of {factor} (e.g. 32 or 64); "
            "set data.image_size accordingly"
        )
    reachable = {image_size // 2**i for i in range(len(channel_mult))}
    bad = sorted(set(attention_resolutions) - reachable)
    if bad:
        raise ValueError(
            f"net.attention_resolutions={list(attention_resolutions)}: {bad} never occur; "
            f"this UNet works at resolutions {sorted(reachable, reverse=True)}"
        )

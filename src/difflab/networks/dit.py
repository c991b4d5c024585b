"""The Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", §3.2), with
PixArt-α's per-block cross-attention for a context sequence (Chen et al. 2023, §2.3).

In the order of the paper: the (latent) image is cut into p x p patches, each linearly embedded as a token (the
"patchify" layer), plus fixed 2-D sin-cos position embeddings; the timestep t (sinusoid → MLP) and the class
(an embedding table with a null class for classifier-free guidance) are summed into one conditioning vector c;
N DiT blocks with adaLN-Zero — LayerNorm without affine parameters, whose shift β and scale γ are regressed from
c, and a gate α regressed from c applied before each residual connection, all three zero-initialised so that
every block starts as the identity; a final adaLN layer and a linear decoder to p·p·C_out values per token;
unpatchify back to (C_out, H, W). With ``context_dim`` each block also cross-attends to a context (B, L, D)
between self-attention and MLP, padded tokens masked (PixArt-α; its output projection is zero-initialised too).

Presets in ``conf/net/dit_*.yaml``: the paper's Table 1 (S/B/L/XL) with p ∈ {2, 4, 8}, and ``dit_tiny`` for CPU.
The factory contract is the UNet's: ``DiT(in_channels=, out_channels=, image_size=, num_classes=[, context_dim=])``
→ ``forward(x, t, y=None, context=None, context_mask=None)``, so every model takes ``net=dit_*``.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.networks.attention import Attention
from difflab.networks.blocks import run_block
from difflab.networks.embeddings import GuidanceEmbedding, add_guidance, timestep_embedding


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embeddings of a grid_size x grid_size token grid: (grid_size², dim).

    As MAE and DiT: token n = i·grid_size + j (row i, column j) gets [sin(j ω), cos(j ω), sin(i ω), cos(i ω)] with
    ω_k = 10000^(−k/(dim/4)), k < dim/4 — the 1-D sinusoid of the timestep embedding on each axis, dim/2 channels each.
    """
    if dim % 4:
        raise ValueError(f"net.hidden_size={dim}: the 2-D sin-cos position embedding needs a multiple of 4")
    index = torch.arange(grid_size * grid_size)
    rows, cols = index // grid_size, index % grid_size
    return torch.cat([timestep_embedding(cols, dim // 2), timestep_embedding(rows, dim // 2)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) normalised, then x·(1 + γ) + β with γ, β (B, 1, D) regressed from the condition."""
    return x * (1 + scale) + shift


def layer_norm(dim: int) -> nn.LayerNorm:
    """LayerNorm without affine parameters (adaLN supplies scale and shift), ε = 1e-6 as DiT."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class PatchEmbed(nn.Module):
    """Patchify: (B, C, H, W) → (B, (H/p)·(W/p), D), a p x p convolution with stride p (a linear map per patch)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ConditionEmbed(nn.Module):
    """c = MLP(sinusoid(t) [+ P·sinusoid(1000 w)]) + E[y]: t (B,) long, y (B,) long or None, w (B,) or None → (B, D).

    The timestep MLP is Linear(256 → D), SiLU, Linear(D → D) on the sinusoid of ``timestep_embedding`` with
    ``freq_shift``; the class table has ``num_classes + 1`` rows, the last being the null class of classifier-free
    guidance (used when y is None). With ``guidance_dim`` the guidance scale w is an input (LCM's w-conditioning): its
    features through a zero-initialised linear P (:class:`GuidanceEmbedding`) join the timestep sinusoid.
    """

    def __init__(
        self,
        hidden_size: int,
        num_classes: int | None,
        frequency_size: int = 256,
        freq_shift: int = 0,
        guidance_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.frequency_size, self.num_classes, self.freq_shift = frequency_size, num_classes, freq_shift
        self.time_mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.class_table = nn.Embedding(num_classes + 1, hidden_size) if num_classes else None
        self.guidance_embed = GuidanceEmbedding(frequency_size, guidance_dim) if guidance_dim else None

    def forward(self, t: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor | None = None) -> torch.Tensor:
        features = timestep_embedding(t, self.frequency_size, freq_shift=self.freq_shift)
        c = self.time_mlp(add_guidance(features, self.guidance_embed, w))
        if self.class_table is not None:
            if y is None:  # an unconditional call of a conditional net: the null class
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            c = c + self.class_table(y)
        return c


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT Fig. 3), with PixArt-α's cross-attention when ``context_dim`` is set.

    (β₁, γ₁, α₁, β₂, γ₂, α₂) = Linear(SiLU(c)), then
        x ← x + α₁ · SelfAttn(LN(x)·(1 + γ₁) + β₁)
        x ← x + CrossAttn(x, context, mask)                     (only with a context)
        x ← x + α₂ · MLP(LN(x)·(1 + γ₂) + β₂)
    x (B, N, D), c (B, D), context (B, L, context_dim), mask (B, L) bool (True = real token) → (B, N, D).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, context_dim: int | None = None
    ) -> None:
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1, self.attn = layer_norm(hidden_size), Attention(hidden_size, num_heads, qkv_bias=True)
        self.cross_attn = Attention(hidden_size, num_heads, context_dim, qkv_bias=True) if context_dim else None
        self.norm2 = layer_norm(hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context, mask)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) then a linear decoder: (B, N, D) → (B, N, p·p·C_out)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = layer_norm(hidden_size)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """ε/x0/v-prediction Diffusion Transformer.

    Args:
        in_channels, out_channels: channels in and out (out = 2·in for learned variances; set by the model).
        image_size: input height = width, a multiple of ``patch_size``; (image_size / patch_size)² tokens.
        patch_size: p, the side of a patch (the paper's 2, 4, 8).
        hidden_size, depth, num_heads, mlp_ratio: token width D, number of DiT blocks, attention heads (must
            divide D), MLP width / D.
        num_classes: if set, a class embedding (+1 null class) is added to the timestep embedding.
        context_dim: if set, every block cross-attends to a context (B, L, context_dim); set by latent diffusion
            from its conditioner.
        frequency_size: channels of the sinusoidal timestep features fed to the timestep MLP (256 in DiT).
        time_freq_shift: 0 (DiT's and DDPM's frequencies max_period^(−k/half)) or 1 (diffusers'
            ``downscale_freq_shift=1``, max_period^(−k/(half − 1)), which its ``DiTTransformer2DModel`` hard-codes:
            a DiT trained with 1 exports to diffusers exactly, see ``difflab.tasks.export_dit``).
        checkpointing: activation checkpointing per DiT block in training (recomputed in the backward pass).
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
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int | None = None,
        context_dim: int | None = None,
        frequency_size: int = 256,
        time_freq_shift: int = 0,
        checkpointing: bool = False,
        guidance_embed: bool = False,
        guidance_embed_dim: int = 256,
    ) -> None:
        super().__init__()
        self.checkpointing = bool(checkpointing)
        _validate(image_size, patch_size, hidden_size, depth, num_heads, mlp_ratio)
        if time_freq_shift not in (0, 1):
            raise ValueError(f"net.time_freq_shift={time_freq_shift}: expected 0 (DiT's) or 1 (diffusers')")
        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.patch_size, self.num_classes, self.context_dim = patch_size, num_classes, context_dim
        self.patch_embed = PatchEmbed(in_channels, hidden_size, patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, image_size // patch_size), persistent=False)
        guidance_dim = int(guidance_embed_dim) if guidance_embed else None
        self.embed = ConditionEmbed(hidden_size, num_classes, frequency_size, int(time_freq_shift), guidance_dim)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, context_dim) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier-uniform linears (and the patch projection, as a linear), zero biases,
        N(0, 0.02) class table and timestep MLP; then adaLN-Zero: every modulation layer and the final linear
        zeroed, so a fresh DiT outputs exactly 0 and every block is the identity. PixArt-α also zeroes the output
        projection of the cross-attention."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.embed.time_mlp[0].weight, std=0.02)
        nn.init.normal_(self.embed.time_mlp[2].weight, std=0.02)
        if self.embed.class_table is not None:
            nn.init.normal_(self.embed.class_table.weight, std=0.02)
        zeroed = [self.final_layer.modulation[-1], self.final_layer.linear]
        if self.embed.guidance_embed is not None:  # zero again after the Xavier pass: the w input starts inert
            nn.init.zeros_(self.embed.guidance_embed.proj.weight)
        for block in self.blocks:
            zeroed.append(block.modulation[-1])
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.to_out)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h·w, p·p·C) tokens in row-major order → (B, C, h·p, w·p) images."""
        b, p, c = x.shape[0], self.patch_size, self.out_channels
        h = w = self.image_size // p
        return x.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.context_dim and context is None:
            raise ValueError("this DiT has cross-attention (net.context_dim is set): it needs a context")
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"DiT built for {self.image_size}x{self.image_size} inputs, got {tuple(x.shape[-2:])}")
        tokens = self.patch_embed(x) + self.pos_embed  # (B, N, D)
        c = self.embed(t, y, w)  # (B, D)
        for block in self.blocks:
            tokens = run_block(block, self.checkpointing, tokens, c, context, context_mask)
        return self.unpatchify(self.final_layer(tokens, c))

    def shard_units(self) -> list[nn.Module]:
        """The modules that FSDP shards as one unit each (gathered just before they run): every DiT block."""
        return list(self.blocks)


def _validate(image_size: int, patch_size: int, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float):
    """Fail at construction, naming the key, for shapes the DiT cannot take."""
    if patch_size < 1 or image_size % patch_size:
        raise ValueError(
            f"net.patch_size={patch_size}: must divide the image size ({image_size}); "
            "set data.image_size or pick a DiT preset with another patch size"
        )
    if depth < 1 or num_heads < 1 or mlp_ratio <= 0:
        raise ValueError(f"net.depth={depth}, net.num_heads={num_heads}, net.mlp_ratio={mlp_ratio}: expected > 0")
    if hidden_size % num_heads or hidden_size % 4:
        raise ValueError(
            f"net.hidden_size={hidden_size}: must be a multiple of net.num_heads={num_heads} and of 4 "
            "(the 2-D position embedding)"
        )

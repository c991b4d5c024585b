"""The DiT against its definitions: a block and the whole network against adaLN-Zero written out from the paper's
equations (Peebles & Xie 2023, §3.2, Fig. 3) in plain tensor algebra, the position embedding against diffusers',
and parameter / Gflops counts against the paper's Table 4."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.networks import DiT
from difflab.networks.dit import DiTBlock, sincos_pos_embed_2d
from difflab.utils.flops import gflops_per_forward

# ---------------------------------------------------------------- the paper's equations, written out


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LN without affine parameters: (x − mean) / sqrt(var + ε) over the channels."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (DiT's MLP): ½x(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    out = x @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def attention(x: torch.Tensor, source: torch.Tensor, attn, heads: int, mask: torch.Tensor | None = None):
    """Multi-head attention: softmax(q kᵀ / √d) v per head, then the output projection; masked keys get weight 0."""
    q, k, v = linear(x, attn.to_q), linear(source, attn.to_k), linear(source, attn.to_v)
    b, n, dim = q.shape
    d = dim // heads
    out = torch.zeros_like(q)
    for h in range(heads):
        qh, kh, vh = (z[..., h * d : (h + 1) * d] for z in (q, k, v))
        scores = qh @ kh.transpose(1, 2) / math.sqrt(d)  # (B, N, L)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        out[..., h * d : (h + 1) * d] = torch.softmax(scores, dim=-1) @ vh
    return linear(out, attn.to_out)


def adaln_zero_block(x, c, block: DiTBlock, heads: int, context=None, mask=None) -> torch.Tensor:
    """DiT block with adaLN-Zero: β, γ, α regressed from c; x + α·f(LN(x)(1 + γ) + β) for f = attention, MLP (with
    PixArt-α's cross-attention x + CrossAttn(x, context) in between). The modulation layer's outputs are in DiT's
    order (β₁, γ₁, α₁, β₂, γ₂, α₂)."""
    params = linear(torch.nn.functional.silu(c), block.modulation[1])
    beta1, gamma1, alpha1, beta2, gamma2, alpha2 = (p[:, None] for p in params.chunk(6, dim=-1))
    h = layer_norm(x) * (1 + gamma1) + beta1
    x = x + alpha1 * attention(h, h, block.attn, heads)
    if context is not None:
        x = x + attention(x, context, block.cross_attn, heads, mask)
    h = layer_norm(x) * (1 + gamma2) + beta2
    return x + alpha2 * linear(gelu_tanh(linear(h, block.mlp[0])), block.mlp[2])


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[sin(p ω_k), cos(p ω_k)], ω_k = 10000^(−k/(dim/2)), in float64."""
    k = torch.arange(dim // 2, dtype=torch.float64)
    args = positions.double()[:, None] * 10000.0 ** (-k / (dim // 2))
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def reference_dit(net: DiT, x, t, y=None, context=None, mask=None) -> torch.Tensor:
    """The whole network from the definitions: patchify (a linear map of each flattened C x p x p patch), + 2-D
    sin-cos positions (column, then row), c = MLP(sinusoid(t)) + E[y], blocks, final adaLN + linear, unpatchify."""
    b, ch, size, _ = x.shape
    p, g = net.patch_size, size // net.patch_size
    patches = x.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, ch * p * p)
    proj = net.patch_embed.proj
    tokens = patches @ proj.weight.reshape(proj.weight.shape[0], -1).T + proj.bias
    dim = tokens.shape[-1]
    grid = torch.arange(g * g)
    tokens = tokens + torch.cat([sinusoid(grid % g, dim // 2), sinusoid(grid // g, dim // 2)], -1).float()
    mlp = net.embed.time_mlp
    c = linear(torch.nn.functional.silu(linear(sinusoid(t, net.embed.frequency_size).float(), mlp[0])), mlp[2])
    if net.num_classes:
        c = c + net.embed.class_table.weight[net.num_classes if y is None else y]
    for block in net.blocks:
        tokens = adaln_zero_block(tokens, c, block, block.attn.num_heads, context, mask)
    final = net.final_layer
    beta, gamma = (z[:, None] for z in linear(torch.nn.functional.silu(c), final.modulation[1]).chunk(2, dim=-1))
    out = linear(layer_norm(tokens) * (1 + gamma) + beta, final.linear)  # (B, g·g, p·p·C_out)
    c_out = net.out_channels
    image = torch.empty(b, c_out, size, size)
    for i in range(g):  # token i·g + j holds the p x p x C_out values of patch (i, j), row-major within the patch
        for j in range(g):
            patch = out[:, i * g + j].reshape(b, p, p, c_out)
            image[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p] = patch.permute(0, 3, 1, 2)
    return image


def randomize(net: torch.nn.Module) -> None:
    """Away from the zero init (gates, final layer), so every term of the equations matters."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in net.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross_masked"])
def test_block_is_adaln_zero_from_the_equations(cross):
    """In float64: outputs reach ~70 here, and float32 kernels (AVX-512, AVX2, plain) differ by ~1e-4 on them, so a
    float32 comparison would test the CPU, not the equations."""
    torch.manual_seed(0)
    block = DiTBlock(32, num_heads=4, context_dim=12 if cross else None)
    randomize(block)
    block.double()
    x, c = torch.randn(3, 10, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)
    context = torch.randn(3, 5, 12, dtype=torch.float64) if cross else None
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool) if cross else None
    expected = adaln_zero_block(x, c, block, heads=4, context=context, mask=mask)
    torch.testing.assert_close(block(x, c, context, mask), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=1, out_channels=1, image_size=8, patch_size=2),
        dict(in_channels=3, out_channels=6, image_size=8, patch_size=4, num_classes=5),
        dict(in_channels=3, out_channels=3, image_size=8, patch_size=2, context_dim=12),
    ],
    ids=["pixels", "latents_learned_sigma_classes", "latents_context"],
)
def test_dit_is_the_reference_network(kwargs):
    torch.manual_seed(0)
    net = DiT(hidden_size=32, depth=2, num_heads=4, frequency_size=16, **kwargs)
    randomize(net)
    x = torch.randn(2, kwargs["in_channels"], 8, 8)
    t = torch.tensor([3, 917])
    y = torch.tensor([4, 1]) if kwargs.get("num_classes") else None
    context = torch.randn(2, 4, 12) if kwargs.get("context_dim") else None
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool) if context is not None else None
    out = net(x, t, y, context, mask)
    assert out.shape == (2, kwargs["out_channels"], 8, 8)
    torch.testing.assert_close(out, reference_dit(net, x, t, y, context, mask), rtol=1e-4, atol=1e-4)
    if kwargs.get("num_classes"):  # y = None is the null class, the last row of the table
        null = torch.full_like(t, kwargs["num_classes"])
        torch.testing.assert_close(net(x, t), net(x, t, null), rtol=0, atol=0)


def test_position_embedding_is_diffusers():
    pytest.importorskip("diffusers")
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for dim, grid in ((64, 4), (384, 16), (1152, 8)):
        expected = get_2d_sincos_pos_embed(dim, grid, base_size=grid, output_type="pt").float()
        torch.testing.assert_close(sincos_pos_embed_2d(dim, grid), expected, rtol=1e-5, atol=1e-5)


# DiT Tables 1 and 4: parameters (M) and Gflops of the class-conditional models on 256x256 images (32x32x4 latents of
# the f = 8 VAE; 1000 classes, learned Σ: 8 output channels), Gflops as the paper counts them (multiply-adds; the
# paper's fvcore count is a few hundredths of a percent above torch's, e.g. DiT-XL/4 29.05 vs our 29.04).
TABLE_4 = {
    "dit_s4": (33, 1.41),
    "dit_s2": (33, 6.06),
    "dit_b4": (130, 5.56),
    "dit_l4": (458, 19.70),
    "dit_xl4": (675, 29.05),
    "dit_xl2": (675, 118.64),
}


@pytest.mark.parametrize("preset", sorted(TABLE_4))
def test_presets_have_the_papers_size_and_gflops(preset):
    """On the meta device (no memory, no arithmetic): the counts come from the shapes alone."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR

    factory = instantiate(OmegaConf.load(CONF_DIR / "net" / f"{preset}.yaml"))
    with torch.device("meta"):
        net = factory(in_channels=4, out_channels=8, image_size=32, num_classes=1000)
        x, t, y = torch.zeros(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    params, gflops = TABLE_4[preset]
    assert round(sum(p.numel() for p in net.parameters()) / 1e6) == params
    assert gflops_per_forward(net, x, t, y) == pytest.approx(gflops, rel=2e-3)

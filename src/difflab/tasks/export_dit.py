"""difflab's DiT (Peebles & Xie 2023) as diffusers' ``DiTTransformer2DModel``, written with a ``DDPMScheduler`` of our
β as ``transformer/`` + ``scheduler/`` and a README.md holding the sampling loop (``format=diffusers``).

The map, tensor for tensor (``load_state_dict(strict=True)`` checks that nothing is left over or missing):

- patchify: ``patch_embed.proj`` → ``pos_embed.proj``; the fixed 2-D sin-cos position table is the same (diffusers
  recomputes it in float64: equal to float32 rounding);
- condition c = MLP(sinusoid(t)) + E[y]: diffusers' sinusoid is ``Timesteps(256, flip_sin_to_cos=True,
  downscale_freq_shift=1)``, [cos, sin] (our time MLP's first linear with its two column halves swapped) at
  frequencies 10⁴^(−k/127), where DiT's are 10⁴^(−k/128): only a DiT trained with ``net.time_freq_shift=1`` has
  diffusers' frequencies. Ours is shared, diffusers gives every block a copy (``transformer_blocks.i.norm1.emb``;
  the final layer uses block 0's), so the time MLP and the class table are copied into each block;
- class table: ours has ``num_classes + 1`` rows, the null class last, as diffusers' ``LabelEmbedding`` with
  dropout > 0 (``num_embeds_ada_norm = num_classes``). diffusers' adaLN-Zero always embeds a label: an unconditional
  DiT becomes ``num_embeds_ada_norm = 0``, a table of one zero row (the null class 0 = num_classes) added to the
  time embedding, which is exactly ours; sample it with ``class_labels = 0``;
- block i: ``modulation.1`` (β₁, γ₁, α₁, β₂, γ₂, α₂) → ``norm1.linear`` (the same chunk order), attention
  ``to_q``/``to_k``/``to_v``/``to_out`` (separate linears with biases in both) → ``attn1.to_q``/…/``to_out.0``,
  MLP Linear, GELU(tanh), Linear → ``ff.net.0.proj``, ``ff.net.2`` (``activation_fn="gelu-approximate"``);
  LayerNorms without affine at ε = 1e-6 (``norm_eps=1e-6``);
- final layer: ``modulation.1`` (β, γ) → ``proj_out_1``, ``linear`` → ``proj_out_2``; unpatchify as ours
  (``nhwpqc → nchpwq``); a learned-variance DiT (2C out channels) → ``out_channels = 2C``.

What does not map (an error naming the key): cross-attention (``net.context_dim``: latent diffusion's class/text
conditioners; diffusers' DiT blocks take a label, no context), ``net.frequency_size`` ≠ 256, ``net.mlp_ratio`` ≠ 4
(diffusers fixes both), and ``net.time_freq_shift=0`` unless ``approximate=true`` (then the output differs; the
measured difference is logged and written in the README).

``DiTPipeline`` is not written (no ``model_index.json``): it decodes every sample with a VAE (``vae.decode``) and
hard-codes ImageNet's null class 1000; a pixel-space DiT has no VAE, so the folder's README gives the loop instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from difflab.networks.dit import DiT

log = logging.getLogger(__name__)
DIFFUSERS_FREQUENCY_SIZE = 256  # CombinedTimestepLabelEmbeddings: Timesteps(num_channels=256, ...)


def dit_transformer_config(net: DiT) -> dict[str, Any]:
    """``DiTTransformer2DModel`` keyword arguments of the same architecture as ``net``; an error for a DiT that
    has no counterpart (cross-attention, other timestep-feature or MLP widths)."""
    if net.context_dim:
        raise ValueError(
            f"format=diffusers: a DiT with cross-attention (net.context_dim={net.context_dim}: latent diffusion's "
            "class/text conditioner) has no DiTTransformer2DModel counterpart (its blocks take a class label, no "
            "context); format=safetensors exports it"
        )
    if net.embed.frequency_size != DIFFUSERS_FREQUENCY_SIZE:
        raise ValueError(
            f"format=diffusers: net.frequency_size={net.embed.frequency_size}; DiTTransformer2DModel's timestep "
            f"features are {DIFFUSERS_FREQUENCY_SIZE} wide (train with net.frequency_size=256)"
        )
    hidden, block = net.patch_embed.proj.out_channels, net.blocks[0]
    if block.mlp[0].out_features != 4 * hidden:
        raise ValueError(
            f"format=diffusers: net.mlp_ratio={block.mlp[0].out_features / hidden:g}; DiTTransformer2DModel's MLP "
            "is 4x wide (train with net.mlp_ratio=4)"
        )
    heads = block.attn.num_heads
    return {
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,
        "num_layers": len(net.blocks),
        "dropout": 0.0,
        "attention_bias": True,
        "sample_size": net.image_size,
        "patch_size": net.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": net.num_classes or 0,  # 0: one (zero) row, the null class of an unconditional DiT
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
    }


def _condition_embedding(net: DiT, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our shared condition embedding under ``CombinedTimestepLabelEmbeddings``' names (``timestep_embedder.*``,
    ``class_embedder.*``): the first linear's [sin | cos] columns as [cos | sin]; an unconditional DiT's table is
    one zero row."""
    half = net.embed.frequency_size // 2
    w = ours["embed.time_mlp.0.weight"]
    table = ours.get("embed.class_table.weight")
    if table is None:
        table = torch.zeros(1, w.shape[0], dtype=w.dtype)
    return {
        "timestep_embedder.linear_1.weight": torch.cat([w[:, half:], w[:, :half]], dim=1),
        "timestep_embedder.linear_1.bias": ours["embed.time_mlp.0.bias"],
        "timestep_embedder.linear_2.weight": ours["embed.time_mlp.2.weight"],
        "timestep_embedder.linear_2.bias": ours["embed.time_mlp.2.bias"],
        "class_embedder.embedding_table.weight": table,
    }


def dit_transformer_state_dict(net: DiT) -> dict[str, torch.Tensor]:
    """``net``'s weights under ``DiTTransformer2DModel``'s names (see the module docstring for the map)."""
    ours = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def copy(src: str, dst: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = ours[f"{src}.weight"], ours[f"{src}.bias"]

    copy("patch_embed.proj", "pos_embed.proj")
    embedding = _condition_embedding(net, ours)
    names = {"modulation.1": "norm1.linear", "mlp.0": "ff.net.0.proj", "mlp.2": "ff.net.2"}
    names |= {f"attn.{p}": f"attn1.{p}" for p in ("to_q", "to_k", "to_v")} | {"attn.to_out": "attn1.to_out.0"}
    for i in range(len(net.blocks)):
        for key, value in embedding.items():
            out[f"transformer_blocks.{i}.norm1.emb.{key}"] = value.clone()  # one copy per block, as diffusers has
        for src, dst in names.items():
            copy(f"blocks.{i}.{src}", f"transformer_blocks.{i}.{dst}")
    copy("final_layer.modulation.1", "proj_out_1")
    copy("final_layer.linear", "proj_out_2")
    return out


def to_diffusers(net: DiT) -> Any:
    """A ``DiTTransformer2DModel`` (eval mode) holding ``net``'s weights, every tensor of both accounted for."""
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel(**dit_transformer_config(net))
    transformer.load_state_dict(dit_transformer_state_dict(net), strict=True)
    return transformer.eval()


@torch.no_grad()
def probe_difference(net: DiT, transformer: Any, num_timesteps: int, batch: int = 8) -> tuple[float, float]:
    """(max |ours − theirs|, max |ours|) of the two networks' outputs on a seeded probe batch: N(0, I) inputs at
    timesteps spread over [0, T), labels cycling through every class and the null class."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size, generator=generator)
    t = torch.linspace(0, num_timesteps - 1, batch).round().long()
    y = torch.arange(batch) % (net.num_classes + 1) if net.num_classes else torch.zeros(batch, dtype=torch.long)
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    ours = net(x.to(device), t.to(device), y.to(device) if net.num_classes else None).float().cpu()
    net.train(was_training)
    theirs = transformer(x, t, class_labels=y).sample
    return (ours - theirs).abs().max().item(), ours.abs().max().item()


def _check_time_frequencies(net: DiT, approximate: bool) -> None:
    if net.embed.freq_shift == 1 or approximate:
        return
    raise ValueError(
        "format=diffusers: this DiT was trained with net.time_freq_shift=0 (DiT's timestep frequencies "
        "10⁴^(−k/128)); DiTTransformer2DModel hard-codes diffusers' 10⁴^(−k/127) (downscale_freq_shift=1), which "
        "no weight can absorb, so its outputs would differ from ours. Train with net.time_freq_shift=1 for an "
        "exact export, or pass approximate=true to export anyway (the measured output difference is reported); "
        "format=safetensors exports it exactly"
    )


README = """# A difflab DiT, exported for diffusers

`transformer/` is a `DiTTransformer2DModel` ({what}, {channels}x{size}x{size} pixels) and `scheduler/` a
`DDPMScheduler` with the model's β, parameterisation and clipping (`DDIMScheduler.from_pretrained` loads it too).
There is no `model_index.json`: diffusers' `DiTPipeline` decodes every sample with a VAE (`vae.decode`) and uses
ImageNet's null class 1000; this DiT works on pixels (no VAE){null_note}, so the pipeline cannot drive it. Sample
it with this loop (DDIM, η = 0, as difflab's `sampler=ddim`):

```python
{code}```
{guidance}{variance}{approximate}"""

CONDITIONAL_LOOP = """import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

transformer = DiTTransformer2DModel.from_pretrained("{out}", subfolder="transformer").eval()
scheduler = DDIMScheduler.from_pretrained("{out}", subfolder="scheduler")
scheduler.set_timesteps({steps})
y = torch.tensor({classes})  # the classes to draw, 0..{last}
null = torch.full_like(y, {null})  # the null class of classifier-free guidance
s = {scale}  # diffusers' guidance_scale = 1 + difflab's w
x = torch.randn(len(y), {channels}, {size}, {size}, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for t in scheduler.timesteps:
        out = transformer(torch.cat([x, x]), t.expand(2 * len(y)), class_labels=torch.cat([y, null])).sample
        cond, uncond = out[:, :{channels}].chunk(2)
        x = scheduler.step(uncond + s * (cond - uncond), t, x, use_clipped_model_output=True).prev_sample
images = (x.clamp(-1, 1) + 1) / 2  # (B, C, H, W) in [0, 1]
"""

UNCONDITIONAL_LOOP = """import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

transformer = DiTTransformer2DModel.from_pretrained("{out}", subfolder="transformer").eval()
scheduler = DDIMScheduler.from_pretrained("{out}", subfolder="scheduler")
scheduler.set_timesteps({steps})
x = torch.randn(4, {channels}, {size}, {size}, generator=torch.Generator().manual_seed(0))
labels = torch.zeros(len(x), dtype=torch.long)  # the one (zero) label row: this DiT is unconditional
with torch.no_grad():
    for t in scheduler.timesteps:
        out = transformer(x, t.expand(len(x)), class_labels=labels).sample[:, :{channels}]
        x = scheduler.step(out, t, x, use_clipped_model_output=True).prev_sample
images = (x.clamp(-1, 1) + 1) / 2  # (B, C, H, W) in [0, 1]
"""

GUIDANCE = """
Classifier-free guidance: difflab's weight w (ε̃ = (1 + w) ε(x, y) − w ε(x, ∅)) is diffusers' `guidance_scale`
s = 1 + w (ε̃ = ε(x, ∅) + s (ε(x, y) − ε(x, ∅))); s = 1 (w = 0) is conditional sampling. Labels 0..{last} are the
classes, {null} the null class (∅).
"""
VARIANCE = """
The network also predicts its variance (learned range: {out_channels} = 2 x {channels} output channels). The loop
uses the first {channels} (the mean); `DDPMScheduler.step` (`variance_type="learned_range"`) takes all of them.
"""
APPROXIMATE = """
**Approximate export** (`approximate=true`): this DiT was trained with DiT's timestep frequencies 10⁴^(−k/128)
(`net.time_freq_shift=0`); `DiTTransformer2DModel` uses 10⁴^(−k/127). On a probe batch (N(0, I) inputs, timesteps
over [0, {T}), every label) its output differs from difflab's by up to {diff:.3g} (outputs up to {scale:.3g}).
Train with `net.time_freq_shift=1` for an exact export.
"""


def model_card(net: DiT, out: Path, guidance: float, num_timesteps: int, probe: tuple[float, float] | None) -> str:
    """The folder's README.md: what it holds, why ``DiTPipeline`` cannot drive it, and the loop that samples it."""
    shape = {"out": out, "channels": net.in_channels, "size": net.image_size, "steps": min(50, num_timesteps)}
    if net.num_classes:
        classes = list(range(min(4, net.num_classes)))
        code = CONDITIONAL_LOOP.format(
            **shape, classes=classes, last=net.num_classes - 1, null=net.num_classes, scale=1.0 + guidance
        )
        what, null_note = f"{net.num_classes} classes", f" with the null class {net.num_classes}"
        guidance_text = GUIDANCE.format(last=net.num_classes - 1, null=net.num_classes)
    else:
        code, what, null_note, guidance_text = UNCONDITIONAL_LOOP.format(**shape), "unconditional", "", ""
    learned = net.out_channels != net.in_channels
    return README.format(
        what=what,
        channels=net.in_channels,
        size=net.image_size,
        null_note=null_note,
        code=code,
        guidance=guidance_text,
        variance=VARIANCE.format(out_channels=net.out_channels, channels=net.in_channels) if learned else "",
        approximate="" if probe is None else APPROXIMATE.format(T=num_timesteps, diff=probe[0], scale=probe[1]),
    )


def export_dit(module: Any, record: dict[str, Any], out: Path, approximate: bool = False) -> Path:
    """Write ``out/transformer`` (``DiTTransformer2DModel``), ``out/scheduler`` (``DDPMScheduler``, as the UNet
    export's) and ``out/README.md`` (the sampling loop); ``approximate``: export a DiT trained with DiT's timestep
    frequencies anyway, reporting the measured output difference."""
    from diffusers import DDPMScheduler

    from difflab.tasks.export_diffusers import scheduler_config

    net = module.net
    transformer = to_diffusers(net)  # the architecture refusals first
    _check_time_frequencies(net, approximate)
    probe = None
    if net.embed.freq_shift != 1:
        probe = probe_difference(net, transformer, module.diffusion.num_timesteps)
        log.warning(
            "format=diffusers approximate=true: this DiT was trained with net.time_freq_shift=0, diffusers' DiT uses "
            "other timestep frequencies: on a probe batch its output differs from ours by up to %.3g (outputs up "
            "to %.3g); train with net.time_freq_shift=1 for an exact export",
            *probe,
        )
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    DDPMScheduler(**scheduler_config(module, record)).save_pretrained(out / "scheduler")
    guidance = float(getattr(module, "guidance_scale", 0.0) or 0.0)
    (out / "README.md").write_text(model_card(net, out, guidance, module.diffusion.num_timesteps, probe))
    log.warning(
        "format=diffusers: wrote %s/transformer (DiTTransformer2DModel) and %s/scheduler; diffusers' DiTPipeline "
        "cannot drive a pixel-space DiT (it decodes with a VAE and uses ImageNet's null class 1000), so there is "
        "no model_index.json: %s/README.md has the sampling loop%s",
        out,
        out,
        out,
        f" (class labels 0..{net.num_classes - 1}, null class {net.num_classes})" if net.num_classes else "",
    )
    return out

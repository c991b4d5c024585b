"""difflab's UNet as diffusers' ``UNet2DModel`` (plus a ``DDPMScheduler`` with our β), saved as a ``DDPMPipeline``
folder that ``DDPMPipeline.from_pretrained`` / ``DDIMPipeline.from_pretrained`` load.

The two UNets are the same architecture (DDPM's, with ADM's scale-shift norm as an option), so the map is 1:1,
tensor for tensor (``load_state_dict(strict=True)`` checks that nothing is left over or missing):

- time: our ``[sin, cos]`` sinusoid → ``flip_sin_to_cos=False, freq_shift=0``; ``time_embed`` → ``time_embedding``;
  the class table (with the null class) → ``class_embedding`` (``num_class_embeds = num_classes + 1``);
- each level's ``num_res_blocks`` ResBlocks (+ attention at ``attention_resolutions``) and its stride-2 conv →
  ``down_blocks.i`` (``AttnDownBlock2D`` / ``DownBlock2D``); the middle → ``mid_block``; the up path (one more
  ResBlock per level, skip concatenation, nearest ×2 + conv) → ``up_blocks.i``;
- a ResBlock: ``in_layers`` → ``norm1``/``conv1``, ``emb_layers`` → ``time_emb_proj``, ``out_norm`` → ``norm2``,
  ``out_layers`` → ``conv2``, a 1x1 skip → ``conv_shortcut``; ``use_scale_shift_norm`` → ``scale_shift``;
- attention: our ``qkv`` 1x1 conv holds q, k, v as three C-row blocks, heads contiguous inside each (as diffusers'
  ``to_q``/``to_k``/``to_v`` linears split them); ``proj_out`` → ``to_out.0``.

A DiT goes to ``DiTTransformer2DModel`` instead (``difflab.tasks.export_dit``).

What does not map (an error naming it): a latent diffusion model (its samples are latents of difflab's autoencoder,
which is not mapped onto diffusers' ``AutoencoderKL``), a UNet with cross-attention (latent diffusion's spatial
transformers; ``UNet2DConditionModel`` would need its own map), several heads whose width changes between
attention levels (``UNet2DModel`` has one ``attention_head_dim``), and a ``num_groups`` that does not divide every
width (we then use fewer groups; diffusers cannot).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.networks.unet import UNet
from difflab.schedules.parameterization import Parameterization

log = logging.getLogger(__name__)
PREDICTION_TYPE = {Parameterization.EPS: "epsilon", Parameterization.X0: "sample", Parameterization.V: "v_prediction"}


def _head_dim(net: UNet, attention_channels: list[int]) -> int | None:
    heads = {m.num_heads for m in net.modules() if hasattr(m, "qkv")}
    dims = {c // h for c in attention_channels for h in heads}
    if heads == {1}:
        return None  # diffusers: one head as wide as each block
    if len(dims) != 1:
        raise ValueError(
            f"format=diffusers: attention head widths {sorted(dims)} differ between levels; UNet2DModel has one "
            "attention_head_dim (train with net.num_head_channels=N, or num_heads=1)"
        )
    return dims.pop()


def unet2d_config(net: UNet, cfg: dict[str, Any]) -> dict[str, Any]:
    """``UNet2DModel`` keyword arguments of the same architecture as ``net`` (built from ``cfg``, its net config)."""
    if not isinstance(net, UNet):
        raise ValueError(
            f"format=diffusers: only difflab's UNet maps onto UNet2DModel (and a DiT onto DiTTransformer2DModel, "
            f"see difflab.tasks.export_dit), not {type(net).__name__}; "
            "format=safetensors exports any network (weights + the config that rebuilds it)"
        )
    if net.context_dim:
        raise ValueError("format=diffusers: a UNet with cross-attention (model=ldm) has no UNet2DModel counterpart")
    mult = list(cfg.get("channel_mult", (1, 2, 2, 2)))
    widths = [net.model_channels * m for m in mult]
    attention = set(cfg.get("attention_resolutions", (16,)))
    num_groups = int(cfg.get("num_groups", 32))
    bad = sorted({m.num_channels for m in net.modules() if isinstance(m, nn.GroupNorm) and m.num_groups != num_groups})
    if bad:
        raise ValueError(f"format=diffusers: net.num_groups={num_groups} does not divide widths {bad} of this UNet")
    resolutions = [net.image_size // 2**i for i in range(len(mult))]
    with_attention = [r in attention for r in resolutions]
    attention_widths = [w for w, a in zip(widths, with_attention, strict=True) if a] + widths[-1:]  # + the middle
    return {
        "sample_size": net.image_size,
        "in_channels": net.in_channels,
        "out_channels": net.out_channels,
        "block_out_channels": widths,
        "layers_per_block": int(cfg.get("num_res_blocks", 2)),
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in with_attention],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention)],
        "attention_head_dim": _head_dim(net, attention_widths),
        "norm_num_groups": num_groups,
        "attn_norm_num_groups": num_groups,  # the middle attention's GroupNorm (diffusers drops it for scale_shift)
        "norm_eps": 1e-5,
        "dropout": float(cfg.get("dropout", 0.0)),
        "resnet_time_scale_shift": "scale_shift" if cfg.get("use_scale_shift_norm", True) else "default",
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu",
        "num_class_embeds": net.num_classes + 1 if net.num_classes else None,
    }


def _resblock(prefix: str, block: nn.Module) -> dict[str, str]:
    names = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj"}
    names |= {"out_norm": "norm2", "out_layers.2": "conv2", "skip": "conv_shortcut"}
    return {f"{ours}.{p}": f"{prefix}.{theirs}.{p}" for ours, theirs in names.items() for p in ("weight", "bias")}


def unet2d_state_dict(net: UNet, levels: int, layers: int) -> dict[str, torch.Tensor]:
    """``net``'s weights under ``UNet2DModel``'s names (see the module docstring for the map)."""
    ours = net.state_dict()
    out: dict[str, torch.Tensor] = {}

    def block(src: str, dst: str, module: nn.Module) -> None:
        if hasattr(module, "qkv"):  # AttentionBlock
            c = module.qkv.out_channels // 3
            w, b = ours[f"{src}.qkv.weight"].reshape(3 * c, c), ours[f"{src}.qkv.bias"]
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = w[i * c : (i + 1) * c], b[i * c : (i + 1) * c]
            out[f"{dst}.to_out.0.weight"] = ours[f"{src}.proj_out.weight"].reshape(c, c)
            out[f"{dst}.to_out.0.bias"] = ours[f"{src}.proj_out.bias"]
            out[f"{dst}.group_norm.weight"], out[f"{dst}.group_norm.bias"] = (
                ours[f"{src}.norm.weight"],
                ours[f"{src}.norm.bias"],
            )
            return
        for key, name in _resblock(dst, module).items():
            if f"{src}.{key}" in ours:
                out[name] = ours[f"{src}.{key}"]

    def copy(src: str, dst: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = ours[f"{src}.weight"], ours[f"{src}.bias"]

    copy("time_embed.0", "time_embedding.linear_1")
    copy("time_embed.2", "time_embedding.linear_2")
    if net.class_embed is not None:
        out["class_embedding.weight"] = ours["class_embed.weight"]
    copy("input_blocks.0.0", "conv_in")
    index = 1
    for level in range(levels):
        for j in range(layers):
            seq = net.input_blocks[index]
            block(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", seq[0])
            if len(seq) > 1:
                block(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", seq[1])
            index += 1
        if level != levels - 1:
            copy(f"input_blocks.{index}.0.op", f"down_blocks.{level}.downsamplers.0.conv")
            index += 1
    for i, name in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        block(f"middle_block.{i}", f"mid_block.{name}", net.middle_block[i])
    for k, seq in enumerate(net.output_blocks):
        level, i = divmod(k, layers + 1)
        block(f"output_blocks.{k}.0", f"up_blocks.{level}.resnets.{i}", seq[0])
        for m, module in enumerate(seq):
            if m and hasattr(module, "qkv"):
                block(f"output_blocks.{k}.{m}", f"up_blocks.{level}.attentions.{i}", module)
            elif m:  # Upsample
                copy(f"output_blocks.{k}.{m}.conv", f"up_blocks.{level}.upsamplers.0.conv")
    copy("out.0", "conv_norm_out")
    copy("out.2", "conv_out")
    return out


def scheduler_config(module: Any, record: dict[str, Any]) -> dict[str, Any]:
    """``DDPMScheduler`` settings of the model: our β (float64, as trained) as ``trained_betas``, the
    parameterisation, variance and clipping of the checkpoint's sampler."""
    sampler = (record.get("config") or {}).get("sampler") or {}
    return {
        "num_train_timesteps": module.diffusion.num_timesteps,
        "trained_betas": module.diffusion.betas.double().tolist(),
        "prediction_type": PREDICTION_TYPE[module.parameterization],
        "variance_type": module.variance_type.value,
        "clip_sample": bool(sampler.get("clip_denoised", True)),
        "clip_sample_range": 1.0,
        "timestep_spacing": "trailing",  # DDIMPipeline's steps as our ddim sampler's default spacing
    }


CONDITIONAL_README = """# A class-conditional difflab UNet, exported for diffusers

diffusers has no pipeline for a class-conditional `UNet2DModel` (`DDPMPipeline` passes no class labels), so this
folder holds the two parts, without a `model_index.json`: `unet/` (`UNet2DModel`, classes 0..{last} and the null
class {null} of classifier-free guidance) and `scheduler/` (`DDPMScheduler` with the model's β). Sample with
guidance weight w (difflab's `guidance_scale`: ε̂ = ε̂(x, ∅) + (1 + w)(ε̂(x, y) − ε̂(x, ∅))):

```python
import torch
from diffusers import DDIMScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("{out}", subfolder="unet").eval()
scheduler = DDIMScheduler.from_pretrained("{out}", subfolder="scheduler")
scheduler.set_timesteps(min(50, scheduler.config.num_train_timesteps))
y = torch.tensor([0, 1, 2, 3])                      # the classes to draw
w, null = {guidance}, torch.full_like(y, {null})
x = torch.randn(len(y), {channels}, {size}, {size})
with torch.no_grad():
    for t in scheduler.timesteps:
        eps_c = unet(x, t, class_labels=y).sample[:, :{channels}]
        eps_u = unet(x, t, class_labels=null).sample[:, :{channels}]
        x = scheduler.step(eps_u + (1 + w) * (eps_c - eps_u), t, x).prev_sample
```
"""


def export_diffusers(module: Any, record: dict[str, Any], out: Path, approximate: bool = False) -> Path:
    """Write ``out/`` as a ``DDPMPipeline`` (``model_index.json``, ``unet/`` safetensors, ``scheduler/``). A
    class-conditional UNet, which no diffusers pipeline drives, is written as ``unet/`` and ``scheduler/`` with a
    README.md holding the sampling loop (class labels, the null class, guidance), and no ``model_index.json``; a
    DiT as ``transformer/`` and ``scheduler/`` with its loop (``export_dit``; ``approximate``: see there)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from difflab.networks.dit import DiT

    if getattr(module.diffusion, "process_kind", "gaussian") == "sigma":
        raise ValueError(
            "format=diffusers: an EDM-family (σ process) model's network lives inside its preconditioning, which no "
            "diffusers scheduler applies; export it with format=safetensors"
        )
    if getattr(module.diffusion, "process_kind", "gaussian") == "flow":
        raise ValueError(
            "format=diffusers: a rectified flow (model=rectified_flow) has no β for a DDPMScheduler, and this export "
            "does not map it onto diffusers' flow-matching schedulers; export it with format=safetensors"
        )
    if getattr(module, "autoencoder", None) is not None:
        raise ValueError(
            "format=diffusers: a latent diffusion model (model=ldm) samples latents of difflab's autoencoder, which "
            "this export does not map onto diffusers' AutoencoderKL, so no diffusers pipeline would decode them; "
            "export it with format=safetensors"
        )
    net = module.net
    if isinstance(net, DiT):
        from difflab.tasks.export_dit import export_dit

        return export_dit(module, record, out, approximate)
    if approximate:
        raise ValueError("approximate=true: only a DiT's export can be approximate; this UNet maps exactly")
    net_cfg = dict((record.get("config") or {}).get("net") or {})
    config = unet2d_config(net, net_cfg)
    unet = UNet2DModel(**config)
    weights = unet2d_state_dict(net, len(config["block_out_channels"]), config["layers_per_block"])
    unet.load_state_dict(weights, strict=True)  # every tensor of both models accounted for
    scheduler = DDPMScheduler(**scheduler_config(module, record))
    if not net.num_classes:
        DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(out, safe_serialization=True)
        return out
    unet.eval().save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    text = CONDITIONAL_README.format(
        last=net.num_classes - 1,
        null=net.num_classes,
        out=out,
        guidance=float(getattr(module, "guidance_scale", 0.0) or 0.0),
        channels=net.in_channels,
        size=net.image_size,
    )
    (out / "README.md").write_text(text)
    log.warning(
        "format=diffusers: a class-conditional UNet has no diffusers pipeline (DDPMPipeline passes no class labels): "
        "wrote %s/unet (UNet2DModel; class_labels=%d is the null class) and %s/scheduler; %s/README.md has the "
        "sampling loop with guidance",
        out,
        net.num_classes,
        out,
        out,
    )
    return out

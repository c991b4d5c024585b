"""The peer side of ``experiments/bench/run.py``: diffusers' UNet2DModel (or DiTTransformer2DModel) in the shape of a
difflab UNet (or DiT) preset, the FLOPs
of a training step, the matmul rate of the same device (the denominator of MFU), and the device sync every timer
of the benchmark reads the clock after.

diffusers is an optional extra (``pip install -e .[bench]``); it is imported only when ``--peer diffusers`` asks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from difflab.utils.flops import count_flops


class DiffusersPeer(nn.Module):
    """A diffusers model with difflab's ``net(x_t, t) -> ε`` signature (diffusers returns an output dataclass).

    ``DiTTransformer2DModel`` is always class-conditional: it gets class 0 for every image (difflab's DiT in the
    benchmark is unconditional; the class embedding is one table row per image, no per-token work).
    """

    def __init__(self, model: nn.Module, class_conditional: bool = False) -> None:
        super().__init__()
        self.model, self.class_conditional = model, class_conditional

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.class_conditional:
            return self.model(x, t, class_labels=torch.zeros_like(t)).sample
        return self.model(x, t).sample


def diffusers_peer(net_cfg: dict[str, Any], channels: int, image_size: int) -> nn.Module:
    """The diffusers network of the same shape as a difflab net config (conf/net/*.yaml): a UNet or a DiT."""
    try:
        import diffusers  # noqa: F401
    except ImportError as err:  # optional extra
        raise SystemExit(f"--peer diffusers needs diffusers: pip install -e .[bench] ({err})") from err
    if net_cfg["_target_"].endswith("DiT"):
        return diffusers_dit(net_cfg, channels, image_size)
    return diffusers_unet(net_cfg, channels, image_size)


def diffusers_dit(net_cfg: dict[str, Any], channels: int, image_size: int) -> nn.Module:
    """diffusers' ``DiTTransformer2DModel`` of a difflab DiT config: same depth, width, heads, patch size, MLP ratio 4
    with tanh-GELU, adaLN-Zero. It differs in bookkeeping only: every block carries its own copy of the timestep MLP
    and class table (diffusers' ``AdaLayerNormZero``), so it has more parameters for the same FLOPs per token."""
    from diffusers import DiTTransformer2DModel  # optional extra, checked by diffusers_peer

    if net_cfg.get("mlp_ratio", 4.0) != 4.0 or net_cfg.get("frequency_size", 256) != 256:
        raise SystemExit("--peer diffusers: DiTTransformer2DModel has mlp_ratio 4 and 256 timestep frequencies")
    heads = net_cfg["num_heads"]
    dit = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=net_cfg["hidden_size"] // heads,
        in_channels=channels,
        out_channels=channels,
        num_layers=net_cfg["depth"],
        sample_size=image_size,
        patch_size=net_cfg["patch_size"],
        num_embeds_ada_norm=1,
    )
    return DiffusersPeer(dit, class_conditional=True)


def diffusers_unet(net_cfg: dict[str, Any], channels: int, image_size: int) -> nn.Module:
    """The diffusers UNet of the same shape as a difflab UNet config.

    Levels ``model_channels * channel_mult``, ``num_res_blocks`` per level, attention blocks at the levels whose
    resolution is in ``attention_resolutions``, same GroupNorm groups, dropout and head count; the additive time
    embedding (diffusers' default, as DDPM and ``unet_m``). For ``unet_m`` this is diffusers' DDPM CIFAR-10 UNet.
    """
    from diffusers import UNet2DModel  # optional extra, checked by diffusers_peer

    mult = list(net_cfg["channel_mult"])
    attn = [image_size // 2**i in set(net_cfg["attention_resolutions"]) for i in range(len(mult))]
    channels_out = tuple(net_cfg["model_channels"] * m for m in mult)
    heads = net_cfg.get("num_heads", 1)
    head_dim = net_cfg.get("num_head_channels", -1)
    unet = UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=channels_out,
        layers_per_block=net_cfg["num_res_blocks"],
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        dropout=net_cfg.get("dropout", 0.0),
        norm_num_groups=net_cfg.get("num_groups", 32),
        # diffusers counts channels per head; difflab heads (num_heads) or channels per head (num_head_channels)
        attention_head_dim=head_dim if head_dim > 0 else max(channels_out) // heads,
        resnet_time_scale_shift="scale_shift" if net_cfg.get("use_scale_shift_norm") else "default",
    )
    return DiffusersPeer(unet)


def train_flops_per_image(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    """FLOPs of one forward + backward per image (torch's FlopCounterMode: matmuls and convolutions, 2 per MAC)."""
    flops = count_flops(lambda: net(x, t).float().square().mean().backward())
    net.zero_grad(set_to_none=True)
    return flops / x.shape[0]


@torch.no_grad()
def forward_flops_per_image(net: nn.Module, x: torch.Tensor, t: torch.Tensor) -> float:
    return count_flops(lambda: net(x, t)) / x.shape[0]


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float | None:
    """The dense matmul rate of ``device`` (n x n x n products, after warm-up): MFU's denominator, measured in the
    same run as the model so that clocks and the card agree. None on CPU (no meaningful peak there)."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clocked(device: torch.device, measured: Callable[[], None], warmup: Callable[[], None] | None = None) -> float:
    """Wall seconds of ``measured`` alone: ``warmup`` (compilation, allocator, cuDNN autotuning) runs first, and
    device syncs bracket the measured work, so the kernels it queues are counted, and nothing queued before."""
    if warmup is not None:
        warmup()
    sync(device)
    start = time.perf_counter()
    measured()
    sync(device)
    return time.perf_counter() - start

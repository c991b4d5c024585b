"""The quality peer of ``quality.py``: a plain training loop over diffusers' ``UNet2DModel`` with our quickstart's
recipe, diffusers' schedulers as a sampling loop, and an adapter that lets difflab's samplers drive the peer.

The peer is what a diffusers user writes (``train_unconditional.py`` reduced to its core): the same 16x16
Fashion-MNIST training images, ``UNet2DModel`` of unet_s's shape (``peer.diffusers_unet``: levels 32/64/64, one
res block each, attention at 4x4; 1.11M parameters), ``DDPMScheduler`` (linear β, T = 1000) for ``add_noise``, MSE on
ε at uniform t, Adam 2e-3 with 100 linear warm-up steps, gradient norm clipped at 1, an EMA of decay 0.995 from the
first step, batch 64 of a seeded shuffle. No difflab code trains it.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

PEER_NET = {  # experiment=quickstart's net: unet_s with attention at 4x4 (conf/experiment_net/quickstart/unet_s.yaml)
    "_target_": "difflab.networks.UNet",
    "model_channels": 32,
    "channel_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [4],
    "num_heads": 4,
    "num_head_channels": -1,
    "dropout": 0.0,
    "num_groups": 8,
    "use_scale_shift_norm": True,
}


def peer_unet(image_size: int = 16) -> nn.Module:
    """diffusers' ``UNet2DModel`` of the quickstart net's shape."""
    from experiments.bench.peer import diffusers_unet

    return diffusers_unet(PEER_NET, 1, image_size).model


def train_peer(train_set: Any, out: Path, seed: int, steps: int, lr: float = 2e-3, warmup: int = 100) -> Path:
    """Train the peer ``steps`` steps on ``train_set`` ((x, y) items, x in [-1, 1]); writes the EMA weights and a
    record to ``out`` (``peer.pt``, ``peer.json``) unless there already; returns the weights' path."""
    weights = out / "peer.pt"
    if weights.is_file():
        return weights
    with torch.enable_grad():
        return _train(train_set, out, seed, steps, lr, warmup)


def _train(train_set: Any, out: Path, seed: int, steps: int, lr: float, warmup: int) -> Path:
    from diffusers import DDPMScheduler

    weights = out / "peer.pt"
    torch.manual_seed(seed)
    unet = peer_unet()
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    warm = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=64, shuffle=True, drop_last=True, generator=order)
    start, step, losses = time.perf_counter(), 0, []
    while step < steps:
        for x, _ in loader:
            noise = torch.randn_like(x)
            t = torch.randint(0, 1000, (x.shape[0],))
            loss = F.mse_loss(unet(scheduler.add_noise(x, noise, t), t).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            warm.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - 0.995)
            losses.append(loss.item())
            step += 1
            if step == steps:
                break
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    torch.save(ema.state_dict(), weights)
    record = {"seed": seed, "steps": steps, "train_seconds": round(seconds, 1), "final_loss": sum(losses[-50:]) / 50}
    (out / "peer.json").write_text(json.dumps(record, indent=2))
    return weights


def load_peer(weights: Path) -> nn.Module:
    unet = peer_unet()
    unet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return unet.eval()


class PeerNet(nn.Module):
    """The peer in difflab's network signature, so that ``DiffusionModule.sample`` and every difflab sampler drive
    it: ``forward(x, t, y=None, ...) -> ε``. t may be fractional (the σ-schedule solvers), as diffusers accepts."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Any = None, **unused: Any) -> torch.Tensor:
        return self.unet(x, t).sample


def diffusers_schedulers() -> dict[str, tuple[Any, int]]:
    """name → (scheduler, steps): diffusers' defaults but for the choices named (Karras σ, trailing spacing)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    return {
        "diffusers dpmpp_2m karras": (DPMSolverMultistepScheduler(**common, use_karras_sigmas=True), 10),
        "diffusers dpmpp_2m_sde karras": (
            DPMSolverMultistepScheduler(**common, use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
            20,
        ),
        "diffusers ddim trailing": (DDIMScheduler(**common, timestep_spacing="trailing"), 50),
    }


@torch.no_grad()
def draw_diffusers(unet: nn.Module, scheduler: Any, steps: int, num: int, batch: int, seed: int) -> torch.Tensor:
    """``num`` samples (num, 1, 16, 16) in [-1, 1] of the ε-network ``unet`` with a diffusers scheduler, batch b
    from the generator seeded ``seed + b`` (x_T and the SDE noise)."""
    chunks = []
    for b, first in enumerate(range(0, num, batch)):
        n = min(batch, num - first)
        generator = torch.Generator().manual_seed(seed + b)
        scheduler.set_timesteps(steps)
        x = torch.randn((n, 1, 16, 16), generator=generator) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        chunks.append(x.clamp(-1, 1))
    return torch.cat(chunks)

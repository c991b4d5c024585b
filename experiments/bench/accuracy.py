"""The accuracy side of ``experiments/bench/run.py``: the fast path against the plain one, on the same weights.

The performance issue asks for speed "with no loss of accuracy": fp32 and optimised outputs agree within bf16
tolerance, and a short training run reaches the same loss curve. Both are measured here, in the benchmark's run:

* *plain*: fp32 (no TF32 on CUDA), eager, NCHW, the foreach AdamW;
* *fast*: what the run's flags ask for (``--precision bf16``, ``--compile``, ``--channels-last``,
  ``--fused-optimizer``).

Loss curve: both trained ``--accuracy-steps`` steps from the same initial weights on the same batches, timesteps and
noise (drawn from one seeded CPU generator), on images with structure a UNet learns in a few hundred steps
(bicubically upsampled 4x4 noise); the curve is reported as means over ten windows of steps. bf16 rounding makes the
two runs drift apart step by step, so the comparison is of the curves, not of the weights.

Outputs: the plain run's trained weights loaded into both, ε̂ on one batch of x_t at timesteps spread over [0, T);
relative L2 error ‖fast − plain‖ / ‖plain‖.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from difflab.schedules import GaussianDiffusion

# ‖fast − plain‖ / ‖plain‖ of ε̂: float reordering in fp32; TF32 (cuDNN's default for fp32 convolutions) keeps 11
# significant bits and bf16 8 (2^-8 ≈ 0.4 % per rounding); a deep network's output error is a few roundings
OUTPUT_RTOL = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 2e-2}
LOSS_RTOL = 0.05  # relative difference of a window's mean loss
WINDOWS = 10


@contextmanager
def strict_fp32():
    """The plain path's precision: fp32 convolutions and matmuls on CUDA too (no TF32), restored after."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def output_rtol(precision: str, device: torch.device) -> float:
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return OUTPUT_RTOL["tf32" if precision == "fp32" and tf32 else precision]


def structured_images(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """(n, channels, size, size) in (−1, 1): bicubic upsampling of 4x4 Gaussian noise, squashed by tanh."""
    low = torch.randn(n, channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).mul(1.5).tanh()


class _Side:
    """One of the two paths: its network, optimizer, memory format, autocast and the scope of all its work."""

    def __init__(
        self,
        net: nn.Module,
        fused: bool,
        channels_last: bool,
        autocast: AbstractContextManager,
        scope: Callable[[], AbstractContextManager],
    ) -> None:
        self.net, self.channels_last, self.autocast, self.scope = net, channels_last, autocast, scope
        self.opt = torch.optim.AdamW(net.parameters(), lr=2e-4, fused=fused or None)

    def fmt(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def eps(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return self.net(self.fmt(x_t), t).float()

    def train(self, data: torch.Tensor, diffusion: GaussianDiffusion, steps: int, batch: int, seed: int) -> list:
        """Per-step losses (a device tensor each: no host sync inside the loop)."""
        torch.manual_seed(seed)  # the same dropout masks on both sides in eager mode (compiled code draws its own)
        g = torch.Generator().manual_seed(seed)
        device, losses = diffusion.betas.device, []
        self.net.train()
        for _ in range(steps):
            idx = torch.randint(0, data.shape[0], (batch,), generator=g)
            t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g).to(device)
            noise = torch.randn((batch, *data.shape[1:]), generator=g).to(device)
            x_t = diffusion.q_sample(self.fmt(data[idx].to(device)), t, self.fmt(noise))
            loss = F.mse_loss(self.eps(x_t, t), noise)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            losses.append(loss.detach())
        return losses


def window_means(losses: list[torch.Tensor]) -> torch.Tensor:
    per_step = torch.stack(losses).float().cpu()
    n = max(1, min(WINDOWS, len(per_step)))
    return per_step[: len(per_step) // n * n].view(n, -1).mean(1)


def bench_accuracy(
    args: argparse.Namespace,
    device: torch.device,
    net: nn.Module,
    optimise: Callable[[nn.Module], nn.Module],
    autocast: Callable[[], AbstractContextManager],
    record: Callable[..., dict],
) -> dict:
    """Compare the plain path on ``net`` with ``optimise(copy of net)`` under ``autocast()`` (see the module doc)."""
    start = time.perf_counter()
    plain_net = net.to(device)
    sides = {
        "plain": _Side(plain_net, False, False, torch.autocast(device.type, enabled=False), strict_fp32),
        "fast": _Side(
            optimise(copy.deepcopy(plain_net)), args.fused_optimizer, args.channels_last, autocast(), nullcontext
        ),
    }
    diffusion = GaussianDiffusion().to(device)
    data = structured_images(max(256, args.batch_size), args.channels, args.image_size, args.seed)
    batch, steps = args.batch_size, max(args.accuracy_steps, 1)
    curves = {}
    for name, side in sides.items():
        with side.scope():
            curves[name] = window_means(side.train(data, diffusion, steps, batch, args.seed + 1))
    rel = (curves["fast"] - curves["plain"]).abs() / curves["plain"]
    # outputs on the plain run's trained weights (at initialisation the UNet's last layer is zero, so is ε̂)
    sides["fast"].net.load_state_dict(sides["plain"].net.state_dict())
    g = torch.Generator().manual_seed(args.seed)
    t = torch.linspace(0, diffusion.num_timesteps - 1, batch).long().to(device)
    x_t = diffusion.q_sample(data[:batch].to(device), t, torch.randn(data[:batch].shape, generator=g).to(device))
    with torch.no_grad():
        eps = {}
        for name, side in sides.items():
            side.net.eval()
            with side.scope():
                eps[name] = side.eps(x_t, t)
    rel_err = ((eps["fast"] - eps["plain"]).norm() / eps["plain"].norm()).item()
    rtol = output_rtol(args.precision, device)
    fields = {
        "output_rel_err": round(rel_err, 6),
        "output_max_abs_err": round((eps["fast"] - eps["plain"]).abs().max().item(), 6),
        "output_rtol": rtol,
        "outputs_agree": rel_err <= rtol,
        "loss_steps": steps,
        "loss_plain": [round(v, 5) for v in curves["plain"].tolist()],
        "loss_fast": [round(v, 5) for v in curves["fast"].tolist()],
        "loss_final_rel_diff": round(rel[-1].item(), 5),
        "loss_max_window_rel_diff": round(rel.max().item(), 5),
        "loss_rtol": LOSS_RTOL,
        "loss_curves_agree": rel.max().item() <= LOSS_RTOL,
    }
    fields["seconds"] = round(time.perf_counter() - start, 2)
    return record(args, device, "accuracy", sum(p.numel() for p in net.parameters()), batch_size=batch, **fields)

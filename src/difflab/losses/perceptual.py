"""Perceptual distances for the autoencoder loss (stage 1 of latent diffusion).

- ``lpips``: torchmetrics' LPIPS (Zhang et al. 2018) — only when its ImageNet backbone weights are present in
  ``$TORCH_HOME/hub/checkpoints/`` (they cannot be downloaded here); an LPIPS from an untrained backbone is never used.
- ``fmnist_cls`` / ``mnist_cls``: the same recipe (unit-normalised channel activations, squared differences, spatial
  mean, summed over layers) on the hidden layers of difflab's shipped dataset classifier, without LPIPS' learned
  linear weights. A named alternative: numbers and logs say ``perceptual_fmnist_cls``, never ``lpips``.
- ``none``: no perceptual term.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.metrics.feature_nets import load_classifier, lpips_weights_path, verified_lpips_weights

PERCEPTUAL_NETS = ("none", "lpips", "fmnist_cls", "fmnist_cls_v2", "mnist_cls")


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class ClassifierPerceptual(nn.Module):
    """Σ_l mean_hw ||n(φ_l(x)) − n(φ_l(x̂))||² over the classifier's conv blocks; x in [-1, 1] → (B,)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        net, _ = load_classifier(name)
        self.blocks, self.in_channels, self.image_size = net.body.eval(), net.in_channels, net.image_size
        for p in self.blocks.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> ClassifierPerceptual:  # frozen: BatchNorm stays in eval
        return super().train(False)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            x = x.mean(dim=1, keepdim=True) if self.in_channels == 1 else x.expand(-1, self.in_channels, -1, -1)
        if x.shape[-1] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear")
        return x.float()

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        a, b = self._prepare(x), self._prepare(x_hat)
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for block in self.blocks:
            a, b = block(a), block(b)
            total = total + (_unit_normalize(a) - _unit_normalize(b)).pow(2).sum(dim=1).mean(dim=(1, 2))
        return total


class LPIPSPerceptual(nn.Module):
    """torchmetrics' LPIPS network as a differentiable loss, x in [-1, 1] → (B,)."""

    def __init__(self, net_type: str = "alex") -> None:
        super().__init__()
        if verified_lpips_weights(net_type) is None:
            path = lpips_weights_path(net_type)
            raise FileNotFoundError(
                f"model.loss.perceptual=lpips needs the ImageNet {net_type} backbone at {path} (no download here). "
                "Put the file there, or use perceptual=fmnist_cls | mnist_cls | none"
            )
        from torchmetrics.functional.image.lpips import _LPIPS

        self.net = _LPIPS(pretrained=True, net=net_type, requires_grad=False).eval()

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        rgb = lambda t: t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t  # noqa: E731
        return self.net(rgb(x).float(), rgb(x_hat).float()).flatten()


def build_perceptual(name: str | None) -> nn.Module | None:
    """The perceptual distance named ``name`` (see the module docstring); None for ``none``."""
    if name is None or name == "none":
        return None
    if name == "lpips":
        return LPIPSPerceptual()
    if name in PERCEPTUAL_NETS:
        return ClassifierPerceptual(name)
    raise ValueError(f"model.loss.perceptual={name!r}: expected one of {list(PERCEPTUAL_NETS)}")

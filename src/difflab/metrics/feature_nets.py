"""Feature networks for FID/KID/IS, and the torchmetrics objects built on them.

- ``inception``: the standard Inception-v3 of the published FID/IS numbers (torchmetrics + torch-fidelity).
  Its weights come by download into ``$TORCH_HOME/hub/checkpoints/``, or from ``inception_weights`` (a local
  ``weights-inception-2015-12-05-6726825d.pth``).
- ``fmnist_cls`` / ``mnist_cls``: difflab's own small classifiers (:class:`difflab.networks.ClassifierNet`),
  trained on Fashion-MNIST / MNIST and shipped in ``difflab/metrics/weights/`` so evaluation works offline.
  Their penultimate features feed FID/KID and their logits IS. Numbers computed with them are NOT comparable to
  published Inception numbers: every metric name carries the network (``fid_fmnist_cls``, ``is_inception``, …).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.networks import ClassifierNet
from difflab.utils.checkpoint_io import load_checkpoint

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FEATURE_NETS = ("inception", "fmnist_cls", "fmnist_cls_v2", "mnist_cls")  # v1 stays the default: see weights/README
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception-v3
# torchvision's ImageNet backbones that torchmetrics' LPIPS loads by download
LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def lpips_weights_path(net_type: str) -> Path:
    """Where torchvision (hence torchmetrics' LPIPS) looks for the ``net_type`` backbone weights."""
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return torch_home / "hub" / "checkpoints" / LPIPS_BACKBONES[net_type]


class FeatureNetUnavailable(RuntimeError):
    """The requested feature network cannot be loaded (missing weights, no network)."""


class ClassifierFeatures(nn.Module):
    """A trained :class:`ClassifierNet` seen by torchmetrics: images in [-1, 1] (B, C, H, W) → features or logits.

    Grayscale nets take RGB input as luminance; ``num_features`` is what torchmetrics reads.
    """

    def __init__(self, net: ClassifierNet, output: str) -> None:
        super().__init__()
        self.net, self.output = net.eval(), output
        self.num_features = net.num_features if output == "features" else net.num_classes
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> ClassifierFeatures:  # torchmetrics calls .train(); stay in eval
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 3 and self.net.in_channels == 1:
            x = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]
        elif x.shape[1] == 1 and self.net.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return self.net.features(x) if self.output == "features" else self.net(x)


def load_classifier(name: str, weights_dir: Path | None = None) -> tuple[ClassifierNet, dict[str, Any]]:
    """Load a shipped classifier and its metadata (dataset, image size, test accuracy, the command that made it)."""
    path = (weights_dir or WEIGHTS_DIR) / f"{name}.pt"
    if not path.is_file():
        raise FeatureNetUnavailable(f"metrics.feature_net={name}: no weights file {path}")
    blob = load_checkpoint(path, f"metrics.feature_net={name}")
    net = ClassifierNet(**blob["net_kwargs"])
    net.load_state_dict(blob["state_dict"])
    return net.eval(), blob["meta"]


def _inception_feature(kind: str, inception_weights: str | None) -> Any:
    """torchmetrics' default Inception feature for ``kind``, or — with a local weights file — the same network
    (``NoTrainInceptionV3``) built from that file, so FID, KID and IS all work offline."""
    if not inception_weights:
        return "logits_unbiased" if kind == "is" else 2048
    from torchmetrics.image.fid import NoTrainInceptionV3

    layer = "logits_unbiased" if kind == "is" else "2048"
    return NoTrainInceptionV3(
        name="inception-v3-compat", features_list=[layer], feature_extractor_weights_path=inception_weights
    )


def make_metric(kind: str, feature_net: str, inception_weights: str | None = None, **kwargs: Any) -> Any:
    """A torchmetrics ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` / ``InceptionScore`` on the net.

    Inputs to ``update`` are images in [-1, 1] for the classifiers; for ``inception`` convert to uint8 first
    (see :func:`to_metric_input`).
    """
    # From the submodules: torchmetrics.image exports these three only when torch-fidelity is installed, but with
    # our own feature nets they need no torch-fidelity at all.
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    classes = {"fid": FrechetInceptionDistance, "kid": KernelInceptionDistance, "is": InceptionScore}
    if kind not in classes:
        raise ValueError(f"metrics={kind!r}: expected one of {sorted(classes)} (or nll)")
    if feature_net not in FEATURE_NETS:
        raise ValueError(f"metrics.feature_net={feature_net!r}: expected one of {list(FEATURE_NETS)}")
    if feature_net == "inception":
        try:
            feature = _inception_feature(kind, inception_weights)
            return classes[kind](feature=feature, **kwargs)
        except ModuleNotFoundError as err:
            raise FeatureNetUnavailable(
                f"feature_net=inception needs torch-fidelity: pip install torch-fidelity ({err})"
            ) from err
        except Exception as err:  # no network and no local file: torch-fidelity's download fails
            raise FeatureNetUnavailable(
                f"feature_net=inception: the standard Inception-v3 weights could not be loaded ({err}). "
                f"Offline: download {INCEPTION_FILE} (torch-fidelity's release files) where you have a network and "
                f"put it in $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/), or pass its path "
                "as inception_weights=/path/to/file; or use an offline net: feature_net=fmnist_cls | fmnist_cls_v2 | "
                "mnist_cls"
            ) from err
    net, _ = load_classifier(feature_net)
    output = "logits" if kind == "is" else "features"
    return classes[kind](feature=ClassifierFeatures(net, output), **kwargs)


def to_metric_input(images: torch.Tensor, feature_net: str) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) → the input the metric's network expects (uint8 RGB for Inception)."""
    if feature_net != "inception":
        return images.float()
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

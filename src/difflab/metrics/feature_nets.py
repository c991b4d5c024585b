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

from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.networks import ClassifierNet
from difflab.utils.checkpoint_io import UnsafeCheckpointError, load_checkpoint, verify_weights_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FEATURE_NETS = ("inception", "fmnist_cls", "fmnist_cls_v2", "mnist_cls")  # v1 stays the default: see weights/README
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception-v3
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
# SHA-256 of that release file, as recorded by users who pin it (its first 8 digits are the ones torch.hub's naming
# convention puts in the file name); checked before torch-fidelity unpickles the file in full.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
# torchvision's ImageNet backbones that torchmetrics' LPIPS loads by download
LPIPS_BACKBONES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


def hub_checkpoints_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``): where torch.hub downloads go."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def lpips_weights_path(net_type: str) -> Path:
    """Where torchvision (hence torchmetrics' LPIPS) looks for the ``net_type`` backbone weights."""
    return hub_checkpoints_dir() / LPIPS_BACKBONES[net_type]


def verified_lpips_weights(net_type: str) -> Path | None:
    """The ``net_type`` backbone file, checked before torchvision unpickles it in full (its SHA-256 prefix, the
    torchvision file name's, and a weights-only open: :func:`difflab.utils.checkpoint_io.verify_weights_file`);
    None when it is missing."""
    path = lpips_weights_path(net_type)
    if not path.is_file():
        return None
    prefix = LPIPS_BACKBONES[net_type].rsplit("-", 1)[1].split(".")[0]
    return verify_weights_file(path, f"lpips_net={net_type}", prefix)


def inception_weights_file(inception_weights: str | None) -> Path:
    """The FID Inception-v3 weights to hand to torch-fidelity, checked against :data:`INCEPTION_SHA256`:
    ``inception_weights`` when given, else the file in ``$TORCH_HOME/hub/checkpoints/`` (downloaded there first
    when missing). torch-fidelity never opens an unchecked file: it always gets this path."""
    if inception_weights:
        path, key = Path(inception_weights), "inception_weights"
        if not path.is_file():
            raise FileNotFoundError(f"inception_weights={inception_weights!r}: no such file")
    else:
        path, key = hub_checkpoints_dir() / INCEPTION_FILE, "feature_net=inception"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(path), hash_prefix=INCEPTION_SHA256)
    return verify_weights_file(path, key, INCEPTION_SHA256)


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
    """torchmetrics' Inception network (``NoTrainInceptionV3``, the one its FID/KID/IS build by default) for ``kind``,
    always from a checked weights file (:func:`inception_weights_file`), so FID, KID and IS also work offline."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    layer = "logits_unbiased" if kind == "is" else "2048"
    weights = str(inception_weights_file(inception_weights))
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[layer], feature_extractor_weights_path=weights)


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
        except UnsafeCheckpointError:
            raise
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

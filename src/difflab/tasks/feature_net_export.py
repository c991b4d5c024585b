"""Export a trained ClassifierModule checkpoint as a shipped feature network (``difflab/metrics/weights/``).

    python src/export.py format=feature_net ckpt=logs/feature_nets/fmnist/checkpoints/last.ckpt \\
        name=fmnist_cls command="python src/train.py experiment=classifier_fmnist"

Measures the test accuracy on the checkpoint's own test split and stores it with the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.metrics.feature_nets import WEIGHTS_DIR
from difflab.modules import load_module
from difflab.modules.checkpoint import stored_data_module
from difflab.utils.config import register_resolvers


@torch.no_grad()
def accuracy(net: torch.nn.Module, loader: torch.utils.data.DataLoader, limit: int | None = None) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((net(x).argmax(1) == y).sum())
        total += y.numel()
        if limit and total >= limit:
            break
    return correct / max(total, 1)


def export(ckpt: str, name: str, command: str, out_dir: Path = WEIGHTS_DIR) -> dict:
    register_resolvers()
    module, record = load_module(ckpt)
    config = record["config"]
    datamodule, _ = stored_data_module(record, f"ckpt={ckpt!r}")
    datamodule.setup("test")
    net = module.net.eval()
    meta = {
        "dataset": config["data"]["_target_"].rsplit(".", 1)[-1],
        "image_size": net.image_size,
        "channels": net.in_channels,
        "test_accuracy": round(accuracy(net, datamodule.test_dataloader()), 4),
        "test_images": len(datamodule.test),
        "global_step": record["global_step"],
        "command": command,
    }
    kwargs = {
        "in_channels": net.in_channels,
        "num_classes": net.num_classes,
        "image_size": net.image_size,
        "width": config["model"]["net"]["width"],
        "num_features": net.num_features,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "net_kwargs": kwargs, "meta": meta}, out_dir / f"{name}.pt")
    return meta

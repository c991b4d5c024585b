"""FID / KID / IS on difflab's feature networks: reference behaviour, DDP equality, the real-statistics cache."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from sklearn.datasets import load_digits

from difflab.metrics import FeatureNetUnavailable, GenerativeMetrics, feature_nets, make_metric
from difflab.networks import ClassifierNet


@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    """A fixed (randomly initialised, seeded) classifier as feature net 'fmnist_cls'."""
    torch.manual_seed(0)
    net = ClassifierNet(in_channels=1, num_classes=10, image_size=16, width=8, num_features=32)
    kwargs = {"in_channels": 1, "num_classes": 10, "image_size": 16, "width": 8, "num_features": 32}
    torch.save({"state_dict": net.state_dict(), "net_kwargs": kwargs, "meta": {}}, tmp_path / "fmnist_cls.pt")
    monkeypatch.setattr(feature_nets, "WEIGHTS_DIR", tmp_path)
    return tmp_path


def digits(n=300) -> torch.Tensor:
    images = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 8 - 1  # (n, 1, 8, 8) in [-1, 1]
    return F.interpolate(images, size=16, mode="bilinear")


def blur(x, sigma):
    k = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(k**2) / (2 * sigma**2))
    k = (k / k.sum())[None, None]
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k[..., None, :])
    return F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k[..., :, None])


def fid_kid(real, fake, metrics=("fid", "kid")):
    gm = GenerativeMetrics(metrics, "fmnist_cls", kid_subset_size=100)
    gm.update_real(real)
    gm.update_fake(fake)
    torch.manual_seed(0)
    return gm.compute()


def test_fid_kid_of_a_set_against_itself_is_zero(weights_dir):
    x = digits()
    values = fid_kid(x, x)
    assert abs(values["fid_fmnist_cls"]) < 1e-3
    assert abs(values["kid_fmnist_cls"]) < 1e-3


def test_fid_kid_grow_with_the_distortion(weights_dir):
    x = digits()
    fids, kids = [], []
    for sigma in (0.5, 1.0, 2.0):
        values = fid_kid(x, blur(x, sigma))
        fids.append(values["fid_fmnist_cls"])
        kids.append(values["kid_fmnist_cls"])
    shifted = fid_kid(x, torch.roll(x, shifts=3, dims=-1))["fid_fmnist_cls"]
    assert 0 < fids[0] < fids[1] < fids[2] and shifted > 0
    assert kids[0] < kids[1] < kids[2] and kids[2] > 0


def test_inception_score_is_that_of_the_feature_nets_softmax():
    """IS through GenerativeMetrics = exp(E_x KL(p(y|x) || p(y))) computed here from the classifier's own logits on
    the same images (the logits, not the features; the images as given, in [-1, 1]). The shipped Fashion-MNIST
    classifier: its predictions on digits vary (a random net's softmax is nearly uniform, IS ≈ 1)."""
    x = digits(200)
    gm = GenerativeMetrics(("is",), "fmnist_cls")
    gm.update_fake(x[:120])
    gm.update_fake(x[120:])
    net, _ = feature_nets.load_classifier("fmnist_cls")
    with torch.no_grad():
        p = F.softmax(net(x).double(), dim=1)
    kl = (p * (p.log() - p.mean(0, keepdim=True).log())).sum(1)
    expected = kl.mean().exp().item()
    assert gm.compute()["is_fmnist_cls"] == pytest.approx(expected, rel=1e-4)
    assert expected > 1.2  # the classifier's predictions vary, so the score is not the trivial 1


def _ddp_worker(rank, world, init_file, real, fake, out_file, weights):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    feature_nets.WEIGHTS_DIR = weights  # a spawned process starts without the test's monkeypatch
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    gm = GenerativeMetrics(("fid", "kid", "is"), "fmnist_cls", kid_subset_size=50)
    half_r, half_f = len(real) // world, len(fake) // world
    gm.update_real(real[rank * half_r : (rank + 1) * half_r])
    gm.update_fake(fake[rank * half_f : (rank + 1) * half_f])
    torch.manual_seed(0)
    values = gm.compute()
    torch.save(values, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_two_process_ddp_equals_single_process(weights_dir, tmp_path):
    real, fake = digits(200), blur(digits(200), 1.0)
    gm = GenerativeMetrics(("fid", "kid", "is"), "fmnist_cls", kid_subset_size=50)
    for r in range(2):  # the same rank order as all_gather's concatenation
        gm.update_real(real[r * 100 : (r + 1) * 100])
    for r in range(2):
        gm.update_fake(fake[r * 100 : (r + 1) * 100])
    torch.manual_seed(0)
    single = gm.compute()
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "init"), real, fake, str(tmp_path / "out"), weights_dir),
        nprocs=2,
        join=True,
    )
    for rank in range(2):
        distributed = torch.load(f"{tmp_path / 'out'}.{rank}")
        for key in ("fid_fmnist_cls", "kid_fmnist_cls", "is_fmnist_cls"):
            assert distributed[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key


class CountingBatches:
    def __init__(self, x):
        self.x, self.calls = x, 0

    def __iter__(self):
        for chunk in self.x.split(50):
            self.calls += 1
            yield chunk


def test_real_statistics_cache_is_reused_and_invalidated(weights_dir, tmp_path):
    real, key = digits(200), {"data": {"_target_": "digits", "image_size": 16}, "split": "test"}
    cache = tmp_path / "cache"

    def fill(num_real=200, k=key):
        batches = CountingBatches(real)
        gm = GenerativeMetrics(("fid", "kid"), "fmnist_cls")
        from_cache = gm.fill_real(batches, num_real, k, cache)
        return gm, from_cache, batches.calls

    first, cached, calls = fill()
    assert not cached and calls == 4
    second, cached, calls = fill()
    assert cached and calls == 0  # no image was read, no feature computed
    torch.testing.assert_close(
        second.real_state()["fid.real_features_sum"], first.real_state()["fid.real_features_sum"]
    )
    assert not fill(num_real=100)[1]  # another count
    assert not fill(k={**key, "data": {"_target_": "digits", "image_size": 32}})[1]  # another resolution
    torch.save({}, weights_dir / "fmnist_cls.pt.bak")
    net = ClassifierNet(in_channels=1, num_classes=10, image_size=16, width=8, num_features=32)
    kwargs = {"in_channels": 1, "num_classes": 10, "image_size": 16, "width": 8, "num_features": 32}
    torch.save({"state_dict": net.state_dict(), "net_kwargs": kwargs, "meta": {}}, weights_dir / "fmnist_cls.pt")
    assert not fill()[1]  # other feature-net weights


def test_inception_offline_fails_with_one_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    try:
        metric = make_metric("fid", "inception")
    except FeatureNetUnavailable as err:
        message = str(err)
        assert "weights-inception-2015-12-05-6726825d.pth" in message and "inception_weights=" in message
        assert "hub/checkpoints" in message
    else:  # a machine with a network (or cached weights) builds it: nothing to check
        assert metric is not None


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="feature_net"):
        make_metric("fid", "vgg")
    with pytest.raises(ValueError, match="metrics="):
        make_metric("lpips", "fmnist_cls")


def test_real_statistics_cache_key_ignores_how_images_are_loaded():
    from omegaconf import OmegaConf

    from difflab.metrics.generative import stats_key

    data = {"_target_": "difflab.data.DigitsDataModule", "image_size": 16, "batch_size": 128, "num_workers": 0}
    base = {"data": data, "split": "test", "feature_net": "mnist_cls", "num_real": 100}
    loader_change = {**base, "data": {**data, "batch_size": 32, "num_workers": 4, "on_device": True}}
    assert stats_key(loader_change) == stats_key(base)
    assert stats_key({**base, "data": OmegaConf.create(data)}) == stats_key(base)  # DictConfig or dict
    assert stats_key({**base, "data": {**data, "image_size": 32}}) != stats_key(base)
    assert stats_key({**base, "split": "val"}) != stats_key(base)

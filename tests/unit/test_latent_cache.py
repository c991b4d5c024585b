"""The on-disk latent cache (issue 30): its safetensors shards, the identities in its manifest, bit-exact moments
(flipped too), atomic writes, refusal of another autoencoder's or another data config's cache, and the
LatentDataModule's splits and checks. A random-weight stage 1 on scikit-learn's digits keeps each test ~1 s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from difflab.data import LatentDataModule
from difflab.data.latent_cache import (
    SafetensorsFile,
    data_identity,
    read_manifest,
    write_safetensors,
)
from difflab.modules import load_autoencoder
from difflab.networks import Autoencoder
from difflab.tasks.encode import encode
from difflab.utils.hashing import state_dict_sha256
from tests.conftest import compose_config

AE_NET = {"embed_dim": 3, "z_channels": 3, "ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "num_groups": 4}
# digits: 1,797 images; 100 train, 40 val, 40 test at 16x16
DATA = ["data=digits", "data.limit_train_size=100", "data.val_size=40", "data.test_size=40"]


def write_autoencoder(path: Path, seed: int = 0, regularizer: str = "kl") -> str:
    """A stage-1 checkpoint of a random-weight autoencoder (16x16x1 → 8x8x3, f = 2), as ``export_autoencoder``
    writes them: weights and the run config, nothing trained."""
    net_cfg = {"_target_": "difflab.networks.Autoencoder", "_partial_": True, "regularizer": regularizer, **AE_NET}
    torch.manual_seed(seed)
    net = Autoencoder(in_channels=1, image_size=16, regularizer=regularizer, n_embed=16, **AE_NET)
    net_cfg["n_embed"] = 16
    config = {"model": {"_target_": "difflab.modules.AutoencoderModule", "image_shape": [1, 16, 16], "net": net_cfg}}
    state = {f"autoencoder.{k}": v for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "difflab": {"config": config}, "global_step": 0}, path)
    return str(path)


def encode_config(tmp_path: Path, ckpt: str, out: Path, *overrides: str):
    args = [f"autoencoder_ckpt={ckpt}", f"out_dir={out}", "shard_size=32", "batch_size=16", "progress=false"]
    return compose_config([*DATA, *args, *overrides], tmp_path, config_name="encode")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """A digits cache (train 100 in shards of 32, val 40, test 40) of a random kl autoencoder."""
    root = tmp_path_factory.mktemp("latent_cache")
    ckpt = write_autoencoder(root / "ae.ckpt")
    cfg = encode_config(root, ckpt, root / "cache")
    result = encode(cfg)
    return {"dir": root / "cache", "ckpt": ckpt, "cfg": cfg, "result": result, "root": root}


def images_of(cfg, split: str, flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data, batch_size=1)
    datamodule.setup("fit")
    dataset = getattr(datamodule, split)
    x, y = dataset.batch(torch.arange(len(dataset)), torch.full((len(dataset),), flip))
    return x, y


def test_shards_are_safetensors_files_both_ways(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = {"moments": torch.randn(5, 6, 2, 2), "labels": torch.arange(5), "odd": torch.ones(3, dtype=torch.uint8)}
    written = write_safetensors(tmp_path / "a.safetensors", tensors, {"split": "train"})
    assert written["bytes"] == (tmp_path / "a.safetensors").stat().st_size
    loaded = safetensors.load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    safetensors.save_file(tensors, tmp_path / "b.safetensors", metadata={"k": "v"})
    ours = SafetensorsFile(tmp_path / "b.safetensors")
    assert ours.metadata == {"k": "v"} and all(torch.equal(ours.tensor(k), v) for k, v in tensors.items())
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsFile(tmp_path / "cut.safetensors")


def test_state_dict_sha256_is_the_weights_identity():
    torch.manual_seed(0)
    a = Autoencoder(in_channels=1, image_size=16, **AE_NET)
    b = Autoencoder(in_channels=1, image_size=16, **AE_NET)
    b.load_state_dict(a.state_dict())
    assert state_dict_sha256(a) == state_dict_sha256(b)
    with torch.no_grad():
        b.decoder.conv_out.bias[0] += 1e-7  # one weight, one ulp away
    assert state_dict_sha256(a) != state_dict_sha256(b)
    assert state_dict_sha256(a) != state_dict_sha256(a.double())


def test_stored_moments_are_encode_moments_bit_for_bit(cache):
    manifest = read_manifest(cache["dir"])
    autoencoder, _ = load_autoencoder(cache["ckpt"])
    assert manifest["autoencoder"]["sha256"] == state_dict_sha256(autoencoder)
    assert manifest["autoencoder"]["ckpt"] == cache["ckpt"] and manifest["moments"]["kind"] == "kl_mean_logvar"
    assert manifest["data"]["sha256"] == data_identity(json.loads(json.dumps(dict(cache["cfg"].data))))["sha256"]
    assert manifest["data"]["config"]["limit_train_size"] == 100 and "batch_size" not in manifest["data"]["config"]
    assert manifest["data"]["num_classes"] == 10 and manifest["data"]["class_names"][0] == "handwritten zero"
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {"train": 100, "val": 40, "test": 40}
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [32, 32, 32, 4]
    datamodule = LatentDataModule(str(cache["dir"]), image_size=16, batch_size=16)
    datamodule.setup()
    for split in ("train", "val", "test"):
        x, y = images_of(cache["cfg"], split)
        with torch.no_grad():  # the encoder's batches: 16 at a time, restarting at each shard
            expected = torch.cat([autoencoder.encode_moments(x[i : i + 16]) for i in range(0, len(x), 16)])
        stored = getattr(datamodule, split)
        moments, labels = stored.batch(torch.arange(len(stored)))
        assert moments.shape == (len(x), 6, 8, 8) and torch.equal(moments, expected), split
        assert torch.equal(labels, y)


def test_random_flips_keep_the_mirrored_images_moments(cache, tmp_path):
    cfg = encode_config(tmp_path, cache["ckpt"], tmp_path / "flip", "data.random_flip=true", "splits=[train,val]")
    encode(cfg)
    assert read_manifest(tmp_path / "flip")["moments"]["flipped"]
    autoencoder, _ = load_autoencoder(cache["ckpt"])
    x, _ = images_of(cfg, "train", flip=True)
    datamodule = LatentDataModule(str(tmp_path / "flip"), image_size=16, batch_size=16, random_flip=True)
    datamodule.setup()
    keys = [(3, True), (40, False), (97, True)]
    moments, _ = datamodule.train.__getitems__(keys).stacked
    with torch.no_grad():
        mirrored = autoencoder.encode_moments(x[[3, 97]])
    torch.testing.assert_close(moments[[0, 2]], mirrored, rtol=1e-5, atol=1e-6)
    assert torch.equal(moments[1], datamodule.train.batch(torch.tensor([40]), torch.tensor([False]))[0][0])
    assert not torch.allclose(moments[0], datamodule.train.batch(torch.tensor([3]), torch.tensor([False]))[0][0])
    with pytest.raises(ValueError, match="holds no mirrored images' latents"):
        LatentDataModule(str(cache["dir"]), image_size=16, random_flip=True).setup()


def test_a_stopped_encode_leaves_no_cache_and_an_incomplete_one_is_refused(cache, tmp_path, monkeypatch):
    from difflab.tasks import encode as task

    write = task.write_safetensors
    calls = []

    def killed_at_the_third_shard(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return write(*args, **kwargs)

    monkeypatch.setattr(task, "write_safetensors", killed_at_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        encode(encode_config(tmp_path, cache["ckpt"], tmp_path / "stopped"))
    assert not (tmp_path / "stopped").exists() and list(tmp_path.glob(".stopped.partial-*")) == []
    with pytest.raises(FileNotFoundError, match="no latent cache there"):
        LatentDataModule(str(tmp_path / "stopped"), image_size=16).setup()
    partial = tmp_path / "killed"  # what SIGKILL leaves: shards without a manifest
    partial.mkdir()
    (partial / "train-00000.safetensors").write_bytes((cache["dir"] / "train-00000.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="not a complete latent cache"):
        LatentDataModule(str(partial), image_size=16).setup()
    cut = tmp_path / "cut"
    cut.mkdir()
    for file in cache["dir"].iterdir():
        (cut / file.name).write_bytes(file.read_bytes())
    (cut / "train-00001.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="train shard train-00001.safetensors is 0 bytes"):
        LatentDataModule(str(cut), image_size=16).setup()


def test_an_existing_cache_is_kept_only_for_the_same_autoencoder_and_data(cache, tmp_path):
    again = encode(cache["cfg"])
    assert not again["written"] and again["manifest"]["created"] == cache["result"]["manifest"]["created"]
    with pytest.raises(FileExistsError, match=r"limit_train_size: 100 → 50.*overwrite=true"):
        encode(encode_config(tmp_path, cache["ckpt"], cache["dir"], "data.limit_train_size=50"))
    other = write_autoencoder(tmp_path / "other.ckpt", seed=1)
    with pytest.raises(FileExistsError, match="autoencoder sha256"):
        encode(encode_config(tmp_path, other, cache["dir"]))
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in cache["dir"].iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    replaced = encode(encode_config(tmp_path, other, copy, "overwrite=true"))
    assert replaced["written"] and read_manifest(copy)["autoencoder"]["ckpt"] == other
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a cache")
    with pytest.raises(FileExistsError, match="is not a latent cache"):
        encode(encode_config(tmp_path, cache["ckpt"], tmp_path / "mine", "overwrite=true"))


def test_encode_refuses_bad_settings(cache, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of batch_size"):
        encode(encode_config(tmp_path, cache["ckpt"], tmp_path / "x", "shard_size=20"))
    with pytest.raises(ValueError, match="encodes images of shape"):
        encode(encode_config(tmp_path, cache["ckpt"], tmp_path / "x", "data.image_size=32"))
    with pytest.raises(ValueError, match="splits="):
        encode(encode_config(tmp_path, cache["ckpt"], tmp_path / "x", "splits=[val]"))


def test_latent_data_module_splits_limits_and_errors(cache):
    datamodule = LatentDataModule(str(cache["dir"]), image_size=16, batch_size=16, limit_train_size=64, val_size=8)
    assert datamodule.num_classes == 10 and datamodule.class_names[1] == "handwritten one"
    datamodule.setup()
    assert (len(datamodule.train), len(datamodule.val), len(datamodule.test)) == (64, 8, 40)
    batches = list(datamodule.train_dataloader())
    assert len(batches) == 4 and batches[0][0].shape == (16, 6, 8, 8) and batches[0][1].dtype == torch.int64
    seen = torch.cat([x for x, _ in batches])
    assert len({tuple(row.flatten()[:4].tolist()) for row in seen}) == 64  # each item once per epoch
    with pytest.raises(ValueError, match="set data.channels=1 data.image_size=16"):
        LatentDataModule(str(cache["dir"]), image_size=32)
    with pytest.raises(ValueError, match="data.on_device=true"):
        LatentDataModule(str(cache["dir"]), image_size=16, on_device=True)
    with pytest.raises(FileNotFoundError, match="src/encode.py"):
        _ = LatentDataModule(str(cache["root"] / "nothing"), image_size=16).num_classes


def test_worker_processes_read_the_same_batches(cache):
    """num_workers > 0: each worker maps the shards itself (a pickled split drops its maps and its image source)."""
    import pickle

    loaders = [
        LatentDataModule(str(cache["dir"]), image_size=16, batch_size=16, num_workers=workers) for workers in (0, 2)
    ]
    first, second = ([x for x, _ in dm.train_dataloader()] for dm in loaders)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    split = pickle.loads(pickle.dumps(loaders[0].train))
    assert torch.equal(split.batch(torch.arange(3))[0], loaders[0].train.batch(torch.arange(3))[0])


def test_the_real_images_come_back_from_the_manifest(cache):
    """FID's real statistics read ``dataset.source``: the image data rebuilt from the manifest's data config."""
    datamodule = LatentDataModule(str(cache["dir"]), image_size=16, batch_size=16)
    datamodule.setup()
    x, _ = images_of(cache["cfg"], "val")
    source = datamodule.val.source
    assert len(source) == 40 and torch.equal(source[5][0], x[5])

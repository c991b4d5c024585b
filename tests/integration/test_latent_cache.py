"""Latent diffusion trained from an on-disk latent cache (issue 30, ``data=latents``): no encoder at training time,
the same first-step loss as encoding on the fly, another autoencoder's cache refused, DiT on latents, exact
mid-epoch resume, sampling and the image-reading tasks from such a checkpoint, `src/encode.py` + `src/train.py
experiment=ldm data=latents` end to end, and disjoint DDP shares."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from difflab.data.latent_cache import read_manifest
from difflab.networks import Autoencoder
from difflab.tasks.encode import encode
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from tests.conftest import ROOT, TINY_DIT, TINY_GENERATIVE_METRICS, cli_ok, compose_config, raises_in_config, run_cli
from tests.integration.test_ldm import LDM_TINY
from tests.unit.test_latent_cache import DATA, encode_config, write_autoencoder
from tests.unit.test_metrics import weights_dir  # noqa: F401  (fixture)

# its module-scoped cache and checkpoints are made once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_latent_cache")

IMAGES = [o for o in LDM_TINY if o != "data=digits"]  # the tiny LDM (16x16 digits, 8x8x3 latents), data chosen below


def on_latents(cache: Path, *overrides: str) -> list[str]:
    return [*IMAGES, "data=latents", f"data.cache_dir={cache}", "data.image_size=16", *overrides]


def on_images(*overrides: str) -> list[str]:
    return [*IMAGES, *DATA, *overrides]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict:
    """The digits cache of a random kl stage 1 (train 100, val 40, test 40) and the stage 1's checkpoint."""
    root = tmp_path_factory.mktemp("latent_cache")
    ckpt = write_autoencoder(root / "ae.ckpt")
    encode(encode_config(root, ckpt, root / "cache"))
    return {"dir": root / "cache", "ckpt": ckpt, "root": root}


class FirstLosses(pl.Callback):
    """Records the training loss of each step (class attribute: the callback is built from the config)."""

    losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        FirstLosses.losses.append(float(outputs["loss"]))


class RecordItems(pl.Callback):
    """Appends a digest of every training item this rank sees to ``<out>/rank<r>.txt``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        digests = [hashlib.sha256(row.cpu().numpy().tobytes()).hexdigest() for row in batch[0]]
        with (self.out / f"rank{trainer.global_rank}.txt").open("a") as file:
            file.write("".join(f"{d}\n" for d in digests))


def test_ldm_trains_validates_and_samples_from_the_cache_without_the_encoder(cache, tmp_path, monkeypatch):
    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran")

    monkeypatch.setattr(Autoencoder, "encode_moments", no_encoder)
    ckpt = f"model.autoencoder_ckpt={cache['ckpt']}"
    result = train(compose_config(on_latents(cache["dir"], ckpt, "trainer.max_steps=3", "logger=csv"), tmp_path))
    assert np.isfinite(result["metrics"]["train/loss"]) and np.isfinite(result["metrics"]["val/loss"])
    assert np.load(result["npz"])["arr_0"].shape == (4, 16, 16, 1)  # decoded to pixel space
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["latent_scale_factor"] not in (None, 1.0)
    out = sample(
        compose_config([f"ckpt={result['checkpoint']}", "num_samples=2", "sampler.steps=3"], tmp_path / "s", "sample")
    )
    assert np.load(out["npz"])["arr_0"].shape == (2, 16, 16, 1)


def test_first_step_loss_equals_encoding_on_the_fly(cache, tmp_path):
    """Same seed, same items in the same order: the posterior noise, t and ε are drawn in the same order from the
    same global stream, so the two paths differ only in where the moments come from (equal up to the conv's
    batch-size-dependent rounding: the cache encoded 16 images at a time in another order)."""
    run = [f"model.autoencoder_ckpt={cache['ckpt']}", "trainer.max_steps=2", "samples.num_samples=0", "logger=none"]
    run += [f"+callbacks.first._target_={__name__}.FirstLosses", "trainer.limit_val_batches=0"]
    losses = {}
    for name, overrides in {"images": on_images(*run), "latents": on_latents(cache["dir"], *run)}.items():
        FirstLosses.losses = []
        train(compose_config(overrides, tmp_path / name))
        losses[name] = FirstLosses.losses
    assert len(losses["images"]) == 2
    np.testing.assert_allclose(losses["latents"], losses["images"], rtol=1e-5)


def test_another_autoencoders_cache_is_refused(cache, tmp_path):
    other = write_autoencoder(tmp_path / "other.ckpt", seed=1)
    cfg = compose_config(on_latents(cache["dir"], f"model.autoencoder_ckpt={other}", "trainer.max_steps=1"), tmp_path)
    sha = read_manifest(cache["dir"])["autoencoder"]["sha256"]
    with pytest.raises(ValueError, match=rf"{cache['dir']}.*was encoded by another autoencoder.*{sha}.*src/encode.py"):
        train(cfg)


def test_a_plain_diffusion_model_on_latents_is_refused(cache, tmp_path):
    overrides = on_latents(cache["dir"], "model=ddpm", "trainer.max_steps=1")
    with pytest.raises(ValueError, match="train them with latent diffusion"):
        train(compose_config([o for o in overrides if not o.startswith("conditioner")], tmp_path))


def test_a_changed_image_size_is_refused_at_construction(cache, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config(on_latents(cache["dir"], "data.image_size=32"), tmp_path)
    with raises_in_config(ValueError, match="holds latents of images of shape"):
        instantiate(cfg.data)


def test_a_dit_trains_on_the_cache(cache, tmp_path):
    overrides = [o for o in TINY_DIT if o != "data=digits"] + ["model=ldm", f"model.autoencoder_ckpt={cache['ckpt']}"]
    overrides += ["data=latents", f"data.cache_dir={cache['dir']}", "data.image_size=16", "trainer.max_steps=2"]
    result = train(compose_config(overrides, tmp_path))
    assert np.isfinite(result["metrics"]["train/loss"])
    assert np.load(result["npz"])["arr_0"].shape == (4, 16, 16, 1)


def test_mid_epoch_resume_on_the_cache_is_exact(cache, tmp_path):
    """100 cached latents in batches of 16: 6 steps an epoch; stopped at step 3, resumed to 8 (past the epoch's
    end), the weights equal the uninterrupted run's bit for bit (posterior samples included)."""
    run = on_latents(cache["dir"], f"model.autoencoder_ckpt={cache['ckpt']}", "samples.num_samples=0", "logger=none")

    def fit(name: str, *extra: str) -> str:
        return train(compose_config([*run, *extra], tmp_path / name))["checkpoint"]

    full = torch.load(fit("full", "trainer.max_steps=8"), weights_only=True)
    first = fit("first", "trainer.max_steps=3")
    resumed = torch.load(fit("resumed", "trainer.max_steps=8", f"ckpt_path={first}"), weights_only=True)
    assert resumed["global_step"] == full["global_step"] == 8
    for key in ("state_dict", "current_model_state"):
        for name, value in full[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)


def test_eval_and_reconstruct_read_the_images_the_cache_was_encoded_from(cache, tmp_path):
    """A checkpoint trained on latents: the tasks that need real images (eval.py's FID, sample.py mode=reconstruct)
    get them from the image data recorded in the cache's manifest."""
    from difflab.modules.checkpoint import read_run_record, stored_data_module

    ckpt = f"model.autoencoder_ckpt={cache['ckpt']}"
    result = train(
        compose_config(on_latents(cache["dir"], ckpt, "trainer.max_steps=1", "samples.num_samples=0"), tmp_path)
    )
    datamodule, data_cfg = stored_data_module(read_run_record(result["checkpoint"]), "test")
    assert type(datamodule).__name__ == "DigitsDataModule" and data_cfg["limit_train_size"] == 100
    overrides = [f"ckpt={result['checkpoint']}", "mode=reconstruct", "num_samples=2", "sampler=ddim", "sampler.eta=0"]
    out = sample(compose_config([*overrides, "sampler.steps=3"], tmp_path / "r", "sample"))
    assert np.isfinite(out["psnr"])


def test_generative_metrics_read_the_real_images_of_the_cache(cache, tmp_path, weights_dir, monkeypatch):  # noqa: F811
    """callbacks.generative_metrics in a run on latents: its real images are the cache's source images (rebuilt
    from the manifest), never the moments."""
    from difflab.callbacks import GenerativeMetricsCallback

    real = []
    batches = GenerativeMetricsCallback._real_batches
    monkeypatch.setattr(
        GenerativeMetricsCallback, "_real_batches", lambda self, t: (real.append(x) or x for x in batches(self, t))
    )
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    overrides = on_latents(cache["dir"], f"model.autoencoder_ckpt={cache['ckpt']}", *TINY_GENERATIVE_METRICS)
    metrics = train(compose_config(overrides, tmp_path))["metrics"]
    assert metrics["val/fid_fmnist_cls"] > 0 and real and real[0].shape[1:] == (1, 16, 16)


def fashion_mnist_available() -> bool:
    from difflab.data import FashionMNISTDataModule

    return FashionMNISTDataModule("data").find() is not None


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST not installed (dataset-fashion-mnist)")
@pytest.mark.parametrize("net", ["unet_s", pytest.param("dit_tiny", marks=pytest.mark.slow)])
def test_encode_then_experiment_ldm_on_latents_end_to_end(tmp_path, net):
    """The README's commands: src/encode.py with the shipped stage 1, src/train.py experiment=ldm scale=cpu
    data=latents (net=dit_tiny too), src/sample.py of its checkpoint."""
    cache = tmp_path / "fm"
    data = ["data.limit_train_size=128", "data.val_size=32"]
    cli_ok(run_cli("encode.py", *data, "splits=[train,val]", f"out_dir={cache}", "progress=false", cwd=tmp_path))
    run_dir = tmp_path / "run"
    overrides = ["experiment=ldm", "scale=cpu", f"net={net}", "data=latents", f"data.cache_dir={cache}"]
    overrides += ["data.batch_size=16", "trainer.max_steps=3", "trainer.limit_val_batches=1", "samples.num_samples=10"]
    overrides += ["samples.sampler.steps=3", f"hydra.run.dir={run_dir}"]
    proc = cli_ok(run_cli("train.py", *overrides, cwd=tmp_path))
    assert "scale_by_std" in proc.stdout + proc.stderr and (run_dir / "samples" / "samples.png").is_file()
    out = tmp_path / "samples"
    cli_ok(
        run_cli(
            "sample.py",
            f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
            "num_samples=2",
            "sampler.steps=3",
            f"out_dir={out}",
            cwd=tmp_path,
        )
    )
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 32, 32, 1)


def test_ddp_ranks_take_disjoint_shares_of_the_cache(cache, tmp_path):
    """trainer=ddp_cpu: each of the 2 ranks gets 3 batches of 16 distinct cached items per epoch, none shared."""
    run_dir, seen = tmp_path / "ddp", tmp_path / "seen"
    seen.mkdir()
    overrides = on_latents(cache["dir"], f"model.autoencoder_ckpt={cache['ckpt']}", "trainer=ddp_cpu")
    overrides += ["trainer.max_steps=3", "samples.num_samples=0", f"hydra.run.dir={run_dir}"]
    overrides += [f"+callbacks.items._target_={__name__}.RecordItems", f"+callbacks.items.out={seen}"]
    cli_ok(run_cli("train.py", *overrides, cwd=tmp_path, timeout=400, env={"PYTHONPATH": str(ROOT)}))
    shares = [(seen / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 48  # 100 items // 2 ranks = 50 → 3 full batches of 16 each
    assert all(len(set(share)) == 48 for share in shares) and not set(shares[0]) & set(shares[1])
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3

"""Metrics in training and the eval CLI, on tiny checkpoints and a seeded stand-in feature network."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from difflab.callbacks import ReconstructionMetricsCallback
from difflab.tasks.eval import evaluate
from difflab.tasks.train import train
from tests.conftest import TINY_GENERATIVE_METRICS, compose_config
from tests.unit.test_metrics import weights_dir  # noqa: F401  (fixture)


def test_generative_metrics_callback_logs_named_metrics(tiny_cfg, weights_dir, tmp_path, monkeypatch):  # noqa: F811
    from difflab.callbacks import GenerativeMetricsCallback

    calls = []
    evaluate = GenerativeMetricsCallback.evaluate
    monkeypatch.setattr(GenerativeMetricsCallback, "evaluate", lambda self, *a: calls.append(1) or evaluate(self, *a))
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    cfg = tiny_cfg(*TINY_GENERATIVE_METRICS)
    metrics = train(cfg)["metrics"]
    assert {"val/fid_fmnist_cls", "val/kid_fmnist_cls", "val/is_fmnist_cls"} <= set(metrics)
    assert metrics["val/fid_fmnist_cls"] > 0 and metrics["val/is_fmnist_cls"] >= 1 - 1e-5  # IS >= 1 up to rounding
    assert list((tmp_path / "cache" / "fid_stats").glob("*.pt"))  # real statistics cached in $DIFFLAB_CACHE
    assert len(calls) == 1  # fit end (step 2) reuses the validation's evaluation at step 2


def test_eval_cli_writes_json_with_fid_and_nll(tiny_cfg, weights_dir, tmp_path):  # noqa: F811
    run = train(tiny_cfg("trainer.max_steps=2", "trainer.limit_train_batches=2", output_dir=tmp_path / "run"))
    cfg = compose_config(
        [
            f"ckpt={run['checkpoint']}",
            "metrics=[fid,kid,is,nll]",
            "num_samples=8",
            "num_real=16",
            "batch_size=8",
            "nll_images=4",
            "sampler=ddim",
            "sampler.steps=5",
        ],
        tmp_path / "eval",
        "eval",
    )
    report = evaluate(cfg)
    saved = json.loads((tmp_path / "run" / "checkpoints" / "last_eval.json").read_text())
    assert saved["results"] == pytest.approx(report["results"])
    results = saved["results"]
    assert results["nll_total_bpd"] > results["nll_decoder_bpd"] > 0 and results["nll_images"] == 4
    assert {"fid_fmnist_cls", "kid_fmnist_cls", "is_fmnist_cls"} <= set(results)
    assert saved["sampler"]["_target_"].endswith("DDIMSampler")


class Reconstructor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def reconstruct(self, x):
        return x + 0.1 * torch.randn_like(x)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0].mean(dim=(1, 2, 3))[:, None]).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_reconstruction_metrics_and_lpips_skip_logged_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    # data in [-0.5, 0.5]: the callback's clamp to [-1, 1] never touches the σ = 0.1 noise of Reconstructor
    data = DataLoader(TensorDataset(torch.rand(32, 1, 16, 16) - 0.5, torch.zeros(32)), batch_size=8)
    callback = ReconstructionMetricsCallback(lpips_net="alex", max_batches=2)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    with caplog.at_level(logging.WARNING):
        trainer.fit(Reconstructor(), data, data)
    assert sum("LPIPS skipped" in r.message for r in caplog.records) == 1
    assert "alexnet-owt-7be5be79.pth" in callback.skip_reason
    metrics = trainer.callback_metrics
    # σ = 0.1 noise, PSNR with data range 2: 10 log10(2² / 0.1²) = 26.02 dB (±0.1 over 4,096 pixels; a
    # data_range of 1 would give 20.0)
    assert float(metrics["val/psnr"]) == pytest.approx(26.02, abs=0.3) and 0 < float(metrics["val/ssim"]) < 1
    assert "val/lpips_alex" not in metrics


def eval_config(ckpt: str, out_dir, *extra: str):
    settings = ["metrics=[fid,nll]", "num_samples=8", "num_real=16", "batch_size=8", "nll_images=2"]
    return compose_config([f"ckpt={ckpt}", *settings, "sampler=ddim", "sampler.steps=2", *extra], out_dir, "eval")


@pytest.mark.parametrize("key", ["out", "cache_dir"])
def test_eval_checks_its_output_folders_before_computing(key, tiny_checkpoint, weights_dir, tmp_path, monkeypatch):  # noqa: F811
    """A folder that cannot be written (here: below a file) fails at once, naming the key, not after the sampling."""
    import difflab.tasks.eval as eval_task

    (tmp_path / "a_file").write_text("")
    target = tmp_path / "a_file" / ("report.json" if key == "out" else "stats")
    monkeypatch.setattr(eval_task, "load_for_sampling", lambda *a: pytest.fail("computed before checking"))
    with pytest.raises(OSError, match=f"{key}: cannot write in {tmp_path / 'a_file'}"):
        evaluate(eval_config(tiny_checkpoint, tmp_path / "eval", f"{key}={target}"))


def test_a_full_disk_leaves_no_partial_report_nor_cache(tiny_checkpoint, weights_dir, tmp_path, monkeypatch, caplog):  # noqa: F811
    """The statistics cache that cannot be written is a warning (the numbers stand); the report that cannot be
    written is an error after the table is printed; neither leaves a partial file or a temporary one."""
    import errno
    import os

    from difflab.utils import paths

    replace = os.replace

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(paths.os, "replace", disk_full)
    out, cache = tmp_path / "report.json", tmp_path / "cache"
    with caplog.at_level(logging.WARNING), pytest.raises(OSError, match=f"No space left on device .*{out}"):
        evaluate(eval_config(tiny_checkpoint, tmp_path / "eval", f"out={out}", f"cache_dir={cache}"))
    monkeypatch.setattr(paths.os, "replace", replace)
    assert "the real statistics were not cached ([Errno 28] No space left on device while writing" in caplog.text
    assert list(tmp_path.glob("*.json")) == [] and list(cache.iterdir()) == []
    assert not list(tmp_path.glob(".*.tmp"))


def reconstruction_config(ckpt: str, out_dir, *extra: str):
    settings = ["metrics=[ssim,psnr]", "reconstruct_images=4", "batch_size=4", f"out={out_dir / 'eval.json'}"]
    return compose_config([f"ckpt={ckpt}", *settings, *extra], out_dir, "eval")


@pytest.fixture(scope="module")
def tiny_autoencoder(tmp_path_factory) -> str:
    from tests.integration.test_ldm import AE_TINY

    out = tmp_path_factory.mktemp("tiny_ae")
    return train(compose_config([*AE_TINY, "trainer.max_steps=2", "trainer.limit_train_batches=2"], out))["checkpoint"]


def test_eval_reconstruction_metrics_of_an_autoencoder(tiny_autoencoder, tmp_path):
    """Issue 28, point 8: eval.py computes SSIM / PSNR of an autoencoder's reconstructions (its own test split),
    the values of the module's reconstruct() measured directly."""
    from torchmetrics.image import PeakSignalNoiseRatio

    from difflab.modules import load_module
    from difflab.modules.checkpoint import stored_data_module

    report = evaluate(reconstruction_config(tiny_autoencoder, tmp_path))
    results = report["results"]
    assert results["reconstruct_images"] == 4 and report["reconstruction"] == "autoencoder"
    module, record = load_module(tiny_autoencoder)
    datamodule, _ = stored_data_module(record, "test")
    datamodule.setup("test")
    x = torch.stack([datamodule.test[i][0] for i in range(4)])
    with torch.no_grad():
        expected = PeakSignalNoiseRatio(data_range=2.0)(module.reconstruct(x), x)
    assert results["psnr"] == pytest.approx(float(expected), rel=1e-5) and 0 < results["ssim"] <= 1
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["psnr"] == results["psnr"]
    with pytest.raises(ValueError, match=r"AutoencoderModule, which does not sample; its metrics are ssim, psnr"):
        evaluate(reconstruction_config(tiny_autoencoder, tmp_path, "metrics=[fid]"))


def test_eval_reconstruction_of_a_diffusion_model_matches_sample_reconstruct(tiny_checkpoint, tmp_path):
    """A diffusion model's reconstruction metrics are its DDIM inversion's, the numbers sample.py mode=reconstruct
    reports for the same test images and sampler."""
    from difflab.tasks.sample import sample

    ddim = ["sampler=ddim", "sampler.eta=0", "sampler.steps=3"]
    report = evaluate(reconstruction_config(tiny_checkpoint, tmp_path, *ddim))
    results = report["results"]
    assert report["reconstruction"] == "ddim inversion, 3 steps"
    sampled = sample(
        compose_config(
            [f"ckpt={tiny_checkpoint}", "mode=reconstruct", "num_samples=4", *ddim], tmp_path / "s", "sample"
        )
    )
    assert results["psnr"] == pytest.approx(sampled["psnr"], rel=1e-5)
    assert results["ssim"] == pytest.approx(sampled["ssim"], rel=1e-5)
    own = evaluate(reconstruction_config(tiny_checkpoint, tmp_path))  # its ancestral sampler: the default DDIM
    assert own["reconstruction"] == "ddim inversion, 20 steps"  # 50 steps, capped at T = 20
    with pytest.raises(ValueError, match="sampler.eta=0"):
        evaluate(reconstruction_config(tiny_checkpoint, tmp_path, "sampler=ddim", "sampler.eta=1", "sampler.steps=3"))


def test_eval_lpips_without_its_backbone_is_a_clear_error(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(
        ValueError, match=r"metrics=\[...,lpips\]: its ImageNet backbone weights .*alexnet-owt-7be5be79"
    ):
        evaluate(reconstruction_config(tiny_checkpoint, tmp_path, "metrics=[ssim,lpips]"))
    expected = r"unknown \['lpip'\]; expected fid, kid, is, nll, ode_nll, straightness, ssim"
    with pytest.raises(ValueError, match=expected):
        evaluate(reconstruction_config(tiny_checkpoint, tmp_path, "metrics=[lpip]"))

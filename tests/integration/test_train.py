"""Training end to end on CPU: fast_dev_run, checkpoints with EMA, exact resume, sampling from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from difflab.data import DatasetNotFoundError
from difflab.modules import CheckpointError, load_module, read_run_record
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from tests.conftest import TINY, compose_config

# its module-scoped checkpoints are trained once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_train")


def test_fast_dev_run_ddpm(tiny_cfg):
    result = train(tiny_cfg("debug=fast", "samples.num_samples=0"))
    assert np.isfinite(result["metrics"]["train/loss"])
    assert "grid" not in result  # samples.num_samples=0: nothing sampled after fit


@pytest.mark.parametrize("parameterization", ["x0", "v"])
def test_other_parameterisations_train(tiny_cfg, parameterization):
    result = train(tiny_cfg("debug=fast", f"model.parameterization={parameterization}"))
    assert np.isfinite(result["metrics"]["train/loss"])


def short_run(tiny_cfg, out: Path, max_steps: int, *extra: str):
    cfg = tiny_cfg(
        f"trainer.max_steps={max_steps}", "trainer.limit_train_batches=3", "logger=csv", *extra, output_dir=out
    )
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return short_run(lambda *o, output_dir: compose_config([*TINY, *o], output_dir), out, 3)


def test_train_writes_checkpoint_samples_and_record(trained):
    cfg, result = trained
    ckpt = Path(result["checkpoint"])
    assert ckpt.name == "last.ckpt" and ckpt.is_file()
    assert Path(result["grid"]).is_file()
    npz = np.load(result["npz"])
    assert npz["arr_0"].shape == (4, 16, 16, 1) and npz["arr_0"].dtype == np.uint8
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["global_step"] == 3
    # the EMA callback: EMA weights in state_dict, raw weights beside them, 3 updates averaged
    assert "current_model_state" in checkpoint and int(checkpoint["averaging_state"]["n_averaged"]) == 3
    assert checkpoint["difflab"]["config"]["model"]["_target_"] == "difflab.modules.DiffusionModule"
    assert checkpoint["difflab"]["loggers"][0]["class"] == "CSVLogger"
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    summary = json.loads((Path(cfg.paths.output_dir) / "run_summary.json").read_text())  # what sweep tables read
    assert summary["status"] == "ok" and summary["metrics"]["train/loss"] == result["metrics"]["train/loss"]
    assert summary["params"] == sum(p.numel() for p in load_module(ckpt)[0].net.parameters())
    assert summary["gflops_per_forward"] > 0 and summary["train_images"] == 3 * cfg.data.batch_size
    assert summary["wall_time_s"] > 0 and summary["train_images_per_s"] is None  # 3 steps < the clock's warm-up


def test_resume_continues_step_ema_optimizer_and_logger_history(trained, tiny_cfg, tmp_path):
    cfg, first = trained
    saved = torch.load(first["checkpoint"], weights_only=True)
    _, second = short_run(tiny_cfg, tmp_path / "resumed", 6, f"ckpt_path={first['checkpoint']}")
    resumed = torch.load(second["checkpoint"], weights_only=True)
    assert resumed["global_step"] == 6
    assert int(resumed["averaging_state"]["n_averaged"]) == 6  # EMA continued, not restarted
    step_saved = saved["optimizer_states"][0]["state"][0]["step"]
    assert float(resumed["optimizer_states"][0]["state"][0]["step"]) == float(step_saved) + 3
    # the CSV history continues in the resumed run's own folder (the source run is not written)
    assert resumed["difflab"]["loggers"][0]["save_dir"] == str(tmp_path / "resumed")
    metrics = tmp_path / "resumed" / "csv" / "version_0" / "metrics.csv"
    steps = [int(line.split(",")[1]) for line in metrics.read_text().splitlines()[1:] if line.split(",")[1]]
    assert min(steps) < 3 <= max(steps)  # a row of the source run (before step 3), then the resumed run's


def test_sample_from_checkpoint_is_reproducible(trained, tmp_path):
    _, result = trained
    outs = []
    for name in ("a", "b"):
        cfg = compose_config([f"ckpt={result['checkpoint']}", "num_samples=6", "seed=7"], tmp_path / name, "sample")
        outs.append(sample(cfg))
    a, b = (np.load(o["npz"])["arr_0"] for o in outs)
    assert a.shape == (6, 16, 16, 1)
    np.testing.assert_array_equal(a, b)
    assert outs[0]["global_step"] == 3


def test_sample_with_another_sampler_config(trained, tmp_path):
    _, result = trained
    cfg = compose_config(
        [f"ckpt={result['checkpoint']}", "num_samples=2", "sampler=ddpm", "sampler.steps=5"], tmp_path, "sample"
    )
    assert np.load(sample(cfg)["npz"])["arr_0"].shape[0] == 2


def test_loaded_module_uses_ema_weights(trained):
    _, result = trained
    module, record = load_module(result["checkpoint"])
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, checkpoint["state_dict"][name])
    assert record["config"]["data"]["_target_"].endswith("DigitsDataModule")


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_run_record(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_run_record(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a difflab checkpoint"):
        load_module(tmp_path / "foreign.ckpt")


def test_missing_dataset_fails_at_setup_listing_locations(tiny_cfg, tmp_path):
    cfg = tiny_cfg("data=mnist", "data.image_size=16", f"data.data_dir={tmp_path / 'nowhere'}", "debug=fast")
    with pytest.raises(DatasetNotFoundError) as info:
        train(cfg)
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "download" in message


def test_run_config_in_checkpoint_is_resolved(trained):
    cfg, result = trained
    config = read_run_record(result["checkpoint"])["config"]
    assert config["model"]["image_shape"] == [1, 16, 16]
    assert OmegaConf.create(config).model.net.model_channels == cfg.net.model_channels


def test_last_checkpoint_holds_the_final_step_when_max_steps_stops_mid_epoch(tiny_cfg, tmp_path):
    # saves every 4 steps, max_steps stops at step 6: Lightning's own ModelCheckpoint leaves last.ckpt at step 4
    every_4 = ["callbacks.model_checkpoint.every_n_train_steps=4", "callbacks.model_checkpoint.every_n_epochs=null"]
    _, result = short_run(tiny_cfg, tmp_path, 6, "trainer.limit_train_batches=10", *every_4)
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["global_step"] == 6
    assert int(checkpoint["averaging_state"]["n_averaged"]) == 6
    # written before the EMA callback copies the EMA over the raw weights: both are still there, distinct
    ema, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step0000004.ckpt"]


def test_last_checkpoint_holds_the_final_step_when_should_stop_is_set(tmp_path):
    # the path of max_time (its Timer sets should_stop) and early stopping, on Lightning's demo model
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.demos.boring_classes import BoringModel

    from difflab.callbacks import ModelCheckpoint

    class StopAt(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop = trainer.should_stop or trainer.global_step == 7

    checkpoint_cb = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=5)
    trainer = Trainer(
        max_epochs=3,
        limit_train_batches=20,
        limit_val_batches=0,
        callbacks=[checkpoint_cb, StopAt()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(BoringModel())
    assert trainer.global_step == 7
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 7


def test_training_from_device_batches(tiny_cfg, tmp_path):
    # data.on_device: the set copied to the training device once, batches gathered there (the CPU here)
    _, result = short_run(tiny_cfg, tmp_path, 4, "data.on_device=true")
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["global_step"] == 4 and np.isfinite(result["metrics"]["train/loss"])


def test_load_module_compiles_as_trained_or_as_asked(trained):
    _, result = trained
    as_trained, _ = load_module(result["checkpoint"])  # trained with model.compile=none
    assert as_trained.compile_mode.value == "none" and as_trained.net._compiled_call_impl is None
    asked, _ = load_module(result["checkpoint"], compile="reduce-overhead")  # sample.py/eval.py compile=...
    assert asked.compile_mode.value == "reduce-overhead" and asked.net._compiled_call_impl is not None


def test_load_module_samples_in_the_precision_trained_or_asked(trained):
    _, result = trained  # trainer=cpu: 32-true
    assert load_module(result["checkpoint"])[0].sample_dtype is None
    asked, _ = load_module(result["checkpoint"], precision="bf16-mixed")  # sample.py/eval.py precision=...
    assert asked.sample_dtype is torch.bfloat16


def test_an_experiment_runs_with_callbacks_none(tmp_path, caplog):
    """quickstart sets callbacks.ema.decay: with callbacks=none that setting has no callback to go to; it is ignored
    with a warning naming it (it used to stop the run at start-up: "config entry 'ema' has no _target_")."""
    import logging

    quick = ["experiment=quickstart", "callbacks=none", "data.limit_train_size=64", "trainer.max_steps=1"]
    quick += ["trainer.limit_val_batches=0", "samples.num_samples=0", "trainer.enable_progress_bar=false"]
    with caplog.at_level(logging.WARNING):
        result = train(compose_config(quick, tmp_path))
    assert np.isfinite(result["metrics"]["train/loss"]) and "checkpoint" not in result  # no ModelCheckpoint
    assert "callbacks.ema sets decay, warmup but no callback of that name is selected (callbacks=...)" in caplog.text


def test_a_run_shorter_than_its_validation_interval_ends_validated(tmp_path):
    """experiment=quickstart validates every 300 steps: a 3-step run used to end without val/loss (an Optuna trial
    then failed after training with "Return value must be float-castable. Got 'None'")."""
    quick = ["experiment=quickstart", "data.limit_train_size=64", "trainer.max_steps=3", "samples.num_samples=0"]
    result = train(compose_config([*quick, "trainer.enable_progress_bar=false"], tmp_path))
    assert np.isfinite(result["metrics"]["val/loss"])
    assert json.loads((tmp_path / "run_summary.json").read_text())["metrics"]["val/loss"] is not None


def test_a_search_objective_that_is_never_logged_fails_at_the_first_validation(tmp_path):
    from difflab.callbacks import ObjectiveNotLogged

    overrides = [*TINY, "hparams_search=optuna_lr_ema", "optimized_metric=val/fid", "trainer.max_steps=4"]
    overrides += ["trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null", "samples.num_samples=0"]
    with pytest.raises(ObjectiveNotLogged, match=r"optimized_metric=val/fid: the run does not log it \(it logs \["):
        train(compose_config(overrides, tmp_path))
    assert not (tmp_path / "checkpoints" / "step0000004.ckpt").exists()  # stopped at step 2, not after the trial


def test_the_run_summary_has_one_value_per_metric(tmp_path):
    """The progress bar's `loss` (the epoch's mean) beside the logged `train/loss` gave two different "losses"."""
    result = train(compose_config([*TINY, "trainer.max_steps=2", "trainer.limit_train_batches=2"], tmp_path))
    assert "loss" not in result["metrics"] and "train/loss" in result["metrics"]
    assert "loss" not in json.loads((tmp_path / "run_summary.json").read_text())["metrics"]

"""Issue 22, point 6: `scale=cpu` sizes every GPU-sized experiment for 2 CPU cores (make train's budget), and
`scale=gpu` runs it as written on one GPU."""

from __future__ import annotations

import math

import pytest
from hydra.utils import instantiate

from difflab.tasks.train import network_size, train
from tests.conftest import compose_config

EXPERIMENTS = ["quickstart", "iddpm", "cfg", "ldm", "autoencoder_kl_f4", "autoencoder_vq_f4"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_cpu_scale_composes_to_small_sizes(experiment, tmp_path):
    gpu = compose_config([f"experiment={experiment}"], tmp_path)
    cfg = compose_config([f"experiment={experiment}", "scale=cpu"], tmp_path)
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    assert cfg.trainer.max_steps <= 2100
    assert experiment == "quickstart" or gpu.trainer.max_steps > 2100  # the quickstart is CPU-sized already
    assert cfg.data.image_size <= 32 and cfg.data.batch_size <= 64
    assert cfg.model.lr_scheduler.warmup_steps <= 100 or "disc_start" in cfg.model.get("loss", {})
    assert cfg.model._target_ == gpu.model._target_  # the method stays the experiment's
    model = instantiate(cfg.model)  # every row builds (the autoencoders' used to fail on scale=cpu's lr_scheduler)
    if experiment.startswith("autoencoder"):
        assert cfg.model.loss.disc_start < cfg.trainer.max_steps and cfg.data.image_size == 32  # ldm's stage 1 size
        assert cfg.model.optimizer.lr == gpu.model.optimizer.lr  # its own learning rate, not the diffusion models'
        return
    params = network_size(model)["params"]
    assert params < 2.5e6, params  # unet_s (1.2M; its spatial transformers for ldm), not unet_m (35.7M)
    if experiment == "ldm":
        assert cfg.data.image_size == 32  # the shipped 32x32 stage 1
    else:
        assert cfg.data.image_size == 16


def test_cpu_scale_keeps_a_net_given_on_the_command_line(tmp_path):
    cfg = compose_config(["experiment=cfg", "scale=cpu", "net=dit_tiny"], tmp_path)
    assert cfg.net._target_.endswith("DiT") and cfg.model.num_classes == 10 and cfg.model.p_uncond == 0.1


def test_gpu_scale_is_the_experiment_on_a_gpu(tmp_path):
    plain = compose_config(["experiment=cfg"], tmp_path)
    cfg = compose_config(["experiment=cfg", "scale=gpu"], tmp_path)
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    assert cfg.net == plain.net and cfg.data.image_size == plain.data.image_size == 32
    assert cfg.trainer.max_steps == plain.trainer.max_steps


def test_cpu_sweep_sweeps_small_nets_at_cpu_scale(tmp_path):
    cfg = compose_config(["hparams_search=schedule_net_cpu"], tmp_path, keep_hydra=True)
    params = cfg.hydra.sweeper.params
    assert params.scale == "cpu" and "unet_m" not in params.net


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_row_of_the_scale_table_trains_at_cpu_scale(experiment, tmp_path):
    """The README's `python src/train.py experiment=<row> scale=cpu`, two steps on 128 images of its data."""
    short = ["trainer.max_steps=2", "data.limit_train_size=128", "trainer.limit_val_batches=1", "samples.num_samples=0"]
    short += ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    result = train(compose_config([f"experiment={experiment}", "scale=cpu", *short], tmp_path))
    assert result["checkpoint"] and math.isfinite(result["metrics"]["train/loss"])

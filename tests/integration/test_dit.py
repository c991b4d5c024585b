"""The DiT in every model (DDPM, iDDPM with learned variances and L_hybrid or L_vlb, CFG; latent diffusion:
tests/integration/test_ldm.py), the README's commands with it, and multirun sweeps with their summary table."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from hydra.utils import instantiate

from difflab.modules import load_module
from difflab.tasks.train import train
from tests.conftest import TINY_DIT, compose_config, run_cli
from tests.conftest import cli_ok as _ok


@pytest.mark.parametrize("model", ["ddpm", "iddpm", "iddpm_vlb", "cfg"])
def test_fast_dev_run_with_a_dit(model, tmp_path):
    cfg = compose_config([*TINY_DIT, f"model={model}", "debug=fast"], tmp_path)
    module = instantiate(cfg.model)
    assert type(module.net).__name__ == "DiT"
    assert module.net.out_channels == (2 if model.startswith("iddpm") else 1)  # learned Σ: 2C outputs
    assert (module.net.embed.class_table is not None) == (model == "cfg")  # class embedding + null class
    result = train(cfg)
    assert np.isfinite(result["metrics"]["train/loss"])
    assert np.load(result["npz"])["arr_0"].shape == (4, 16, 16, 1)


# the README's `python src/train.py net=dit_s2` with tiny sizes substituted (digits, 2 images a batch, one step)
SMALL = ["data=digits", "data.batch_size=2", "schedule.num_timesteps=20", "trainer=cpu", "samples.num_samples=2"]


def test_readme_train_dit_s2(tmp_path):
    run_dir = tmp_path / "run"
    _ok(run_cli("train.py", "net=dit_s2", *SMALL, "debug=fast", f"hydra.run.dir={run_dir}", cwd=tmp_path))
    assert (run_dir / "samples" / "samples.png").is_file()
    assert (run_dir / "run_summary.json").is_file()
    assert not list(tmp_path.rglob("sweep_summary.*"))  # a single run: the sweep callback does nothing


def test_multirun_over_unet_and_dit_writes_the_sweep_summary(tmp_path):
    """The README's `-m net=unet_s,dit_tiny experiment=quickstart trainer.max_steps=...` (tiny sizes): one job per
    net, each with its own experiment_net specialisation, and a sweep_summary.{csv,md} row per job."""
    sweep = tmp_path / "sweep"
    overrides = ["data.limit_train_size=256", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]
    overrides += ["samples.num_samples=2", "sampler.steps=3", "trainer.enable_progress_bar=false"]
    _ok(
        run_cli(
            "train.py",
            "-m",
            "net=unet_s,dit_tiny",
            "experiment=quickstart",
            "trainer.max_steps=3",
            *overrides,
            f"hydra.sweep.dir={sweep}",
            cwd=tmp_path,
            timeout=400,
        )
    )
    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv")))
    jobs = ["0_net-unet_s", "1_net-dit_tiny"]  # named by the override that varies
    assert [(r["job"], r["net"], r["status"]) for r in rows] == [(jobs[0], "unet_s", "ok"), (jobs[1], "dit_tiny", "ok")]
    for row in rows:
        assert int(row["params"]) > 0 and float(row["gflops_per_forward"]) > 0 and float(row["wall_time_s"]) > 0
        assert int(row["train_images"]) == 3 * 64 and np.isfinite(float(row["val/loss"]))
    md = (sweep / "sweep_summary.md").read_text()
    assert f"| {jobs[0]} | ok | unet_s |" in md and f"| {jobs[1]} | ok | dit_tiny |" in md
    assert "experiment=quickstart" in md
    nets = [load_module(sweep / job / "checkpoints" / "last.ckpt")[1]["config"]["net"] for job in jobs]
    assert nets[0]["attention_resolutions"] == [4]  # conf/experiment_net/quickstart/unet_s.yaml
    assert nets[1]["_target_"] == "difflab.networks.DiT" and "attention_resolutions" not in nets[1]


def test_a_failed_job_gets_a_row_with_its_error(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train.py",
        "-m",
        *TINY_DIT,
        "net.patch_size=2,3",  # 16x16 digits: patch size 3 fails at construction
        "trainer.max_steps=1",
        "samples.num_samples=0",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode != 0
    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv")))
    assert [(r["net.patch_size"], r["status"]) for r in rows] == [("2", "ok"), ("3", "failed")]
    assert "net.patch_size=3: must divide the image size (16)" in rows[1]["error"]
    assert "- job 1_net.patch_size-3: " in (sweep / "sweep_summary.md").read_text()

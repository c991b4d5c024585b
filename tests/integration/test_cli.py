"""The command-line entry points in subprocesses: resolved config, DDP on 2 CPU processes, multirun, wandb."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY, run_cli
from tests.conftest import cli_ok as _ok


def test_cfg_job_prints_resolved_config(tmp_path):
    proc = _ok(run_cli("train.py", "--cfg", "job", "--resolve", "model=ddpm", "data=digits", cwd=tmp_path))
    assert "_target_: difflab.modules.DiffusionModule" in proc.stdout
    assert "${" not in proc.stdout  # fully resolved
    assert "beta_schedule: linear" in proc.stdout


def test_ddp_cpu_two_processes_one_checkpoint_and_one_log_dir(tmp_path):
    run_dir = tmp_path / "ddp"
    _ok(
        run_cli(
            "train.py",
            *TINY,
            "trainer=ddp_cpu",
            "trainer.max_steps=4",
            "trainer.limit_train_batches=2",
            "logger=csv",
            "data.on_device=true",  # per-rank shares of a device-resident set (DataLoader + DDP: test_ldm)
            # FID/KID/IS with the shipped classifier: each rank samples its share, compute runs on both (no hang)
            "callbacks=[default,generative_metrics]",
            "callbacks.generative_metrics.every_n_epochs=1",
            "callbacks.generative_metrics.num_samples=8",
            "callbacks.generative_metrics.num_real=16",
            "callbacks.generative_metrics.batch_size=4",
            "callbacks.generative_metrics.kid_subset_size=4",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
            timeout=400,
        )
    )
    metrics_csv = (run_dir / "csv" / "version_0" / "metrics.csv").read_text()
    assert "val/fid_fmnist_cls" in metrics_csv and "val/is_fmnist_cls" in metrics_csv
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt", "step0000004.ckpt"]
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert (run_dir / "samples" / "samples.png").is_file()
    assert not list(tmp_path.glob("logs/train/runs/*"))  # the second rank wrote into the same run dir


def test_multirun_two_jobs_with_wandb_offline(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = _ok(
        run_cli(
            "train.py",
            "-m",
            *TINY,
            "schedule=linear,cosine",
            "trainer.max_steps=2",
            "trainer.limit_train_batches=2",
            "logger=wandb",
            f"hydra.sweep.dir={sweep_dir}",
            cwd=tmp_path,
            timeout=400,
            env={"WANDB_MODE": "", "WANDB_SILENT": "true"},
        )
    )
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit())
    # job folders named by the overrides that vary (the TINY ones are the same in every job)
    assert [p.name for p in jobs] == ["0_schedule-linear", "1_schedule-cosine"], proc.stdout
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        runs = list((job / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"{job}: expected one offline wandb run, got {runs}"
        assert list(runs[0].glob("run-*.wandb")), "the run file is missing"
        debug_log = (runs[0] / "logs" / "debug.log").read_text()
        assert debug_log.count("finishing run") == 1, "each job's wandb run is finished exactly once"
    schedules = {
        torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["difflab"]["config"]["schedule"][
            "beta_schedule"
        ]
        for job in jobs
    }
    assert schedules == {"linear", "cosine"}


def test_sample_cli_writes_grid_and_npz(tmp_path):
    run_dir = tmp_path / "run"
    _ok(run_cli("train.py", *TINY, "trainer.max_steps=2", f"hydra.run.dir={run_dir}", cwd=tmp_path))
    out = tmp_path / "samples"
    _ok(
        run_cli(
            "sample.py",
            f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
            "num_samples=5",
            "seed=1",
            f"hydra.run.dir={out}",
            cwd=tmp_path,
        )
    )
    assert (out / "samples.png").is_file()
    assert np.load(out / "samples.npz")["arr_0"].shape == (5, 16, 16, 1)


def test_missing_dataset_message_on_the_cli(tmp_path):
    proc = run_cli(
        "train.py",
        *TINY,
        "data=mnist",
        "data.image_size=16",
        f"data.data_dir={tmp_path / 'none'}",
        "debug=fast",
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "DatasetNotFoundError" in proc.stderr and str(tmp_path / "none") in proc.stderr


@pytest.mark.slow
def test_make_train_quickstart_learns(tmp_path):
    """The `make train` run itself (about 5 minutes on 2 cores): the loss must fall well below its start."""
    run_dir = tmp_path / "quick"
    _ok(run_cli("train.py", "experiment=quickstart", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=900))
    import csv

    rows = list(csv.DictReader(open(run_dir / "csv" / "version_0" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert np.mean(losses[-5:]) < 0.5 * losses[0]
    assert (run_dir / "samples" / "samples.png").is_file()

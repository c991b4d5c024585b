"""The sweep table from job dirs as Hydra leaves them (``.hydra/overrides.yaml``, ``.hydra/hydra.yaml``) with the
``run_summary.json`` each job writes; and the training throughput clock behind its images/s."""

from __future__ import annotations

import csv
import io
import json
import sys
import time
import warnings

import lightning.pytorch as pl
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from difflab.callbacks import TrainThroughput
from difflab.utils import sweep_summary
from difflab.utils.sweep_summary import (
    JOB_DIRNAME_MAX,
    RUN_SUMMARY,
    job_dirname,
    sweep_name,
    write_run_summary,
    write_sweep_summary,
)
from tests.conftest import bare_trainer, tiny_diffusion_module


def fake_job(sweep, name: str, num: int, overrides: list[str], summary: dict | None) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": {"job": {"num": num}}}), job / ".hydra" / "hydra.yaml")
    if summary is not None:
        write_run_summary(job, **summary)


def test_one_row_per_job_in_job_order(tmp_path):
    common = ["trainer.max_steps=10", "data=digits"]
    fake_job(tmp_path, "10", 10, [*common, "net=dit_tiny"], {"metrics": {"val/loss": 0.5}, "params": 7})
    fake_job(
        tmp_path,
        "2",
        2,
        [*common, "net=unet_s"],
        {"metrics": {"val/loss": float("nan"), "final/fid": 3.25}, "params": 12, "gflops_per_forward": 0.125},
    )
    fake_job(tmp_path, "3", 3, [*common, "net=bad"], {"status": "failed", "error": "ValueError: net.patch_size=3"})
    fake_job(tmp_path, "4", 4, [*common, "net=running"], None)
    rows = write_sweep_summary(tmp_path)
    assert [r["job"] for r in rows] == ["2", "3", "4", "10"]  # hydra.job.num order, not string order
    assert json.loads((tmp_path / "2" / RUN_SUMMARY).read_text())["metrics"]["val/loss"] is None  # NaN → null

    table = list(csv.DictReader(io.StringIO((tmp_path / "sweep_summary.csv").read_text())))
    assert [r["net"] for r in table] == ["unet_s", "bad", "running", "dit_tiny"]
    assert [r["status"] for r in table] == ["ok", "failed", "no summary", "ok"]
    assert table[0]["final/fid"] == "3.25" and table[0]["gflops_per_forward"] == "0.125" and table[0]["val/loss"] == ""
    assert table[0]["overrides"] == "trainer.max_steps=10 data=digits net=unet_s" and table[3]["params"] == "7"
    assert table[1]["error"] == "ValueError: net.patch_size=3"

    md = (tmp_path / "sweep_summary.md").read_text()
    assert "Overrides of every job: `trainer.max_steps=10 data=digits`" in md
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    assert header.split(" | ")[:3] == ["| job", "status", "net"]  # only the varying override is a column
    assert "| 2 | ok | unet_s | 12 | 0.125 |" in md and "- job 3: ValueError: net.patch_size=3" in md


def test_empty_dir_writes_nothing(tmp_path):
    assert write_sweep_summary(tmp_path) == [] and not list(tmp_path.iterdir())


class SlowValidation(pl.Callback):
    """Validation that takes a second (after the throughput clock has paused)."""

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        time.sleep(1.0)


def test_throughput_counts_images_and_leaves_validation_out():
    module = tiny_diffusion_module()
    clock = TrainThroughput(warmup_steps=2)
    trainer = bare_trainer(
        max_steps=8,
        limit_val_batches=1,
        val_check_interval=3,
        num_sanity_val_steps=0,
        callbacks=[clock, SlowValidation()],
    )
    data = TensorDataset(torch.rand(40, 1, 8, 8) * 2 - 1, torch.zeros(40, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        start = time.perf_counter()
        trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))
    total = time.perf_counter() - start
    assert clock.images == 8 * 4 and clock.timed_images == 6 * 4
    assert total > 2.0 and 0 < clock.seconds < total - 2.0  # both validations (2 x 1 s) are left out
    assert clock.images_per_s == clock.timed_images / clock.seconds


def test_throughput_of_a_run_shorter_than_its_warmup_is_none():
    clock = TrainThroughput(warmup_steps=5)
    trainer = bare_trainer(max_steps=2, callbacks=[clock])
    data = TensorDataset(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(does not have many workers|Skipping val loop).*")
        trainer.fit(tiny_diffusion_module(), DataLoader(data, batch_size=4))
    assert clock.images == 8 and clock.images_per_s is None


def _hydra_root(task: list[str], exclude: list[str] | None = None, **hydra: object):
    job = {"num": 3, "config": {"override_dirname": {"exclude_keys": exclude or []}}}
    return OmegaConf.create({"hydra": {"overrides": {"task": task}, "job": job, **hydra}})


def test_job_dirname_names_a_job_by_the_overrides_that_vary(monkeypatch):
    argv = ["train.py", "-m", "data=digits", "trainer.enable_progress_bar=false", "schedule=linear,cosine"]
    monkeypatch.setattr(sys, "argv", argv)
    task = ["data=digits", "trainer.enable_progress_bar=False", "schedule=cosine", "model.optimizer.lr=0.00023276939"]
    root = _hydra_root([*task, "hparams_search=optuna_lr_ema", "data.data_dir=/a/b"], exclude=["hparams_search"])
    # the command line's fixed overrides (also as Hydra rewrites them: false → False) and excluded keys are left out;
    # Optuna's long floats shortened; a path's "/" made safe
    name = job_dirname(3, _root_=root)
    assert name == "3_data.data_dir-_a_b+model.optimizer.lr-0.0002328+schedule-cosine"
    # no = nor , (Hydra's grammar splits at them): a path into the folder is a plain ckpt= value
    assert OverridesParser.create().parse_override(f"ckpt=logs/{name}/last.ckpt").value() == f"logs/{name}/last.ckpt"
    assert job_dirname(0, _root_=_hydra_root(["data=digits"])) == "0"  # nothing varies: the number alone
    long = _hydra_root([f"key{i}=value{i}" for i in range(40)])
    name = job_dirname(7, _root_=long)
    assert name.startswith("7_key0-value0+") and len(name) == len("7_") + JOB_DIRNAME_MAX and "/" not in name


def test_jobs_named_by_overrides_keep_the_job_order(tmp_path):
    fake_job(tmp_path, "10_net=dit_tiny", 10, ["net=dit_tiny"], {"metrics": {}})
    fake_job(tmp_path, "9_net=unet_s", 9, ["net=unet_s"], {"metrics": {}})
    (tmp_path / "10_net=dit_tiny" / ".hydra" / "hydra.yaml").unlink()  # the number from the name then
    assert [r["job"] for r in write_sweep_summary(tmp_path)] == ["9_net=unet_s", "10_net=dit_tiny"]


def test_sweep_name_is_the_sweep_dir_in_a_multirun_and_the_default_otherwise(tmp_path, monkeypatch):
    assert sweep_name("train") == "train"  # outside Hydra
    job_dir = tmp_path / "multiruns" / "2026-12-01_18-30-00" / "1_schedule=cosine"
    hydra = OmegaConf.create({"mode": RunMode.MULTIRUN, "runtime": {"output_dir": str(job_dir)}})
    hydra.sweep = {"subdir": "1_schedule=cosine"}

    class Fake:  # HydraConfig as a running job sees it
        initialized = staticmethod(lambda: True)
        get = staticmethod(lambda: hydra)

    monkeypatch.setattr(sweep_summary, "HydraConfig", Fake)
    assert sweep_name("train") == "train_2026-12-01_18-30-00"
    hydra.mode = RunMode.RUN
    assert sweep_name("train") == "train"

"""Run directories: unique for runs started in the same second, none left behind by a failed start; a DDP rank
that raises takes the others down within seconds, showing its error."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from difflab.utils.run_dir import is_unused, remove_if_unused_on_error, unique_dir
from tests.conftest import CONF_DIR, ROOT, TINY, run_cli


def test_unique_dir_never_hands_out_an_existing_directory(tmp_path):
    base = str(tmp_path / "runs" / "2026-01-01_12-00-00")
    assert [unique_dir(base) for _ in range(3)] == [base, f"{base}_1", f"{base}_2"]
    assert all(os.path.isdir(p) for p in (base, f"{base}_1", f"{base}_2"))


def test_run_and_sweep_dirs_use_it():
    hydra = yaml.safe_load((CONF_DIR / "hydra" / "default.yaml").read_text())
    common = yaml.safe_load((CONF_DIR / "hydra" / "common.yaml").read_text())
    assert hydra["run"]["dir"].startswith("${run_dir:${given_out_dir:},") and common["sweep"]["dir"].startswith(
        "${unique_dir:"
    )
    assert "common" in hydra["defaults"]
    # eval.py writes only its report: run dir = the launch dir, no .hydra/ record
    evaluation = yaml.safe_load((CONF_DIR / "hydra" / "eval.yaml").read_text())
    assert (
        "common" in evaluation["defaults"] and evaluation["run"]["dir"] == "." and evaluation["output_subdir"] is None
    )


def test_a_multiruns_sweep_dir_resolves_before_hydras_config_is_set(tmp_path, monkeypatch):
    """Hydra's launcher resolves hydra.sweep.dir before it sets its config: `python src/train.py -m ...` (README)
    failed with "HydraConfig was not set" while paths.root_dir read ${hydra:runtime.cwd}."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.delenv("DIFFLAB_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["schedule=cosine"], return_hydra_config=True)
    HydraConfig.instance().cfg = None
    assert cfg.hydra.sweep.dir.startswith(str(tmp_path / "logs" / "train" / "multiruns"))


def test_only_unused_run_dirs_are_removed_on_error(tmp_path):
    for name, content in [("unused", None), ("used", "checkpoints")]:
        run_dir = tmp_path / name
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / "train.log").write_text("")
        if content:
            (run_dir / content).mkdir()
        with pytest.raises(ValueError), remove_if_unused_on_error(run_dir):
            raise ValueError("bad config")
    assert not (tmp_path / "unused").exists() and (tmp_path / "used" / "checkpoints").is_dir()
    assert not is_unused(tmp_path / "used")


def test_two_runs_started_together_get_their_own_run_dirs(tmp_path):
    """Both launches ask for the same directory name (as two runs started in the same second do)."""
    same = f"hydra.run.dir=${{unique_dir:{tmp_path / 'runs' / 'same'}}}"
    env = {**os.environ, "DIFFLAB_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "1"}
    args = [*TINY, "trainer.max_steps=1", "samples.num_samples=0", "logger=none", same]
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "src" / "train.py"), *args, f"seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert [p.name for p in run_dirs] == ["same", "same_1"]
    seeds = set()
    for run_dir in run_dirs:  # each run's checkpoint and overrides are its own
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        seed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["difflab"]["config"]["seed"]
        assert f"seed={seed}" in overrides
        seeds.add(seed)
    assert seeds == {1, 2}


def test_a_config_error_names_the_key_and_leaves_no_run_dir(tmp_path):
    proc = run_cli("train.py", *TINY, "model.optimizer.lr=-1", cwd=tmp_path)
    assert proc.returncode != 0
    assert "model.optimizer.lr: Invalid learning rate: -1" in proc.stderr
    assert list((tmp_path / "logs" / "train" / "runs").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_ddp_rank_that_raises_stops_the_others_within_seconds(tmp_path, rank):
    stamp = tmp_path / "raised_at"
    proc = run_cli(
        "train.py",
        *TINY,
        "trainer=ddp_cpu",
        "trainer.max_steps=6",
        "+callbacks.fail._target_=tests.helpers.RaiseOnRank",
        f"+callbacks.fail.rank={rank}",
        f"+callbacks.fail.stamp={stamp}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=400,
        env={"PYTHONPATH": str(ROOT)},
    )
    ended = time.time()
    assert proc.returncode != 0
    assert f"injected failure on rank {rank} at step 2" in proc.stderr  # the original error, not only a peer's
    assert ended - float(stamp.read_text()) < 30, "the other rank did not stop within seconds"

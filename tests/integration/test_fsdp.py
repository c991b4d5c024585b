"""trainer=fsdp on 2 CPU processes (gloo): the loss curve and weights equal DDP's, sharded checkpoints resume
bit-exactly (also on another number of processes), sample.py reads them as any other, and the error paths."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from difflab.utils.checkpoint_io import load_checkpoint
from difflab.utils.sharded_checkpoint import is_sharded_checkpoint
from tests.conftest import ROOT, TINY_DIT, cli_ok, run_cli

pytestmark = pytest.mark.xdist_group("test_fsdp")  # module-scoped runs, trained once

# a DiT of 2 blocks on digits, 2 processes × 8 images a batch; validation by steps; every step logged
FSDP_TINY = [
    *TINY_DIT,
    "data.batch_size=8",
    "data.limit_train_size=96",
    "trainer.log_every_n_steps=1",
    "trainer.val_check_interval=3",
    "trainer.check_val_every_n_epoch=null",
    "callbacks.sample_grid.num_samples=2",
    "samples.num_samples=2",
    "samples.sampler.steps=2",
    "model.lr_scheduler.warmup_steps=2",
]


def train_run(root: Path, name: str, *overrides: str) -> Path:
    """``src/train.py`` with ``FSDP_TINY`` and ``overrides`` into ``root/name``; returns the run dir."""
    run_dir = root / name
    base = [o for o in FSDP_TINY if "model=edm" not in overrides or not o.startswith("schedule.")]  # σ: no T
    base = [o for o in base if "experiment=ldm" not in overrides or not o.startswith("callbacks.sample_grid")]
    args = (*base, *overrides, f"hydra.run.dir={run_dir}")
    cli_ok(run_cli("train.py", *args, cwd=root, timeout=600, env={"PYTHONPATH": str(ROOT)}))  # tests.helpers
    return run_dir


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss per step from the CSV logger."""
    rows = list(csv.DictReader((next((run_dir / "csv").rglob("metrics.csv"))).open()))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """DDP and FSDP, 6 steps each, and FSDP stopped at step 3 (a sharded checkpoint to resume)."""
    root = tmp_path_factory.mktemp("fsdp")
    return {
        "ddp": train_run(root, "ddp", "trainer=ddp_cpu", "trainer.max_steps=6"),
        "fsdp": train_run(root, "fsdp", "trainer=fsdp_cpu", "trainer.max_steps=6"),
        "half": train_run(root, "half", "trainer=fsdp_cpu", "trainer.max_steps=3"),
        "root": root,
    }


def test_fsdp_loss_curve_and_weights_equal_ddp(runs):
    ddp, fsdp = losses(runs["ddp"]), losses(runs["fsdp"])
    assert sorted(ddp) == sorted(fsdp) and len(ddp) == 6
    for step in ddp:  # the same batches, gradients averaged by an all-reduce vs a reduce-scatter: float32 rounding
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5, abs=1e-6), step
    sharded = runs["fsdp"] / "checkpoints" / "last.ckpt"
    assert sharded.is_symlink() and is_sharded_checkpoint(sharded)
    a, b = load_checkpoint(runs["ddp"] / "checkpoints" / "last.ckpt"), load_checkpoint(sharded)
    assert a["global_step"] == b["global_step"] == 6
    for key in ("state_dict", "current_model_state"):  # EMA and raw weights
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-4, atol=1e-5, msg=f"{key}/{name}")
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert state_a.keys() == state_b.keys()  # consolidated into torch's layout (parameters by index)
    for i in state_a:
        torch.testing.assert_close(state_b[i]["exp_avg_sq"], state_a[i]["exp_avg_sq"], rtol=1e-3, atol=1e-9)


def test_fsdp_resume_from_a_sharded_checkpoint_is_bit_exact(runs):
    resumed = train_run(
        runs["root"],
        "resumed",
        "trainer=fsdp_cpu",
        "trainer.max_steps=6",
        f"ckpt_path={runs['half'] / 'checkpoints' / 'last.ckpt'}",
    )
    a = load_checkpoint(runs["fsdp"] / "checkpoints" / "last.ckpt")
    b = load_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert b["global_step"] == 6
    for key in ("state_dict", "current_model_state"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}/{name}"
    for i, entry in a["optimizer_states"][0]["state"].items():
        for k, value in entry.items():
            assert torch.equal(value, b["optimizer_states"][0]["state"][i][k]), (i, k)
    assert losses(resumed) == losses(runs["fsdp"])  # the logger's history continued, steps 3-5 recomputed


def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(runs):
    """Written by 2 processes, read by 1 (FSDP) and by plain single-device training: the restored raw and EMA
    weights are the checkpoint's, exactly."""
    checkpoint = runs["half"] / "checkpoints" / "last.ckpt"
    stored = load_checkpoint(checkpoint)
    for trainer, name in (("trainer=fsdp_cpu trainer.devices=1", "one"), ("trainer=cpu", "plain")):
        dump = runs["root"] / f"{name}.pt"
        train_run(
            runs["root"],
            name,
            *trainer.split(),
            "trainer.max_steps=4",
            f"ckpt_path={checkpoint}",
            "+callbacks.dump._target_=tests.helpers.DumpWeightsAtTrainStart",
            f"+callbacks.dump.path={dump}",
        )
        restored = torch.load(dump, weights_only=True)
        assert restored["step"] == 3
        for param, value in restored["raw"].items():
            assert torch.equal(value, stored["current_model_state"][param]), param
        for param, value in restored["ema"].items():  # FSDP's sharded EMA (the plain run's is Lightning's)
            assert torch.equal(value, stored["state_dict"][param]), param


def test_sample_py_reads_a_sharded_checkpoint(runs, tmp_path):
    checkpoint = runs["fsdp"] / "checkpoints" / "last.ckpt"
    cli_ok(
        run_cli(
            "sample.py", f"ckpt={checkpoint}", "num_samples=2", "sampler.steps=2", f"out_dir={tmp_path}", cwd=tmp_path
        )
    )
    assert (tmp_path / "samples.png").is_file()
    final = runs["fsdp"] / "samples" / "samples.npz"  # drawn after fit by the 2 processes of the sharded model
    assert final.is_file()


def test_fsdp_refuses_a_module_it_cannot_shard(tmp_path):
    proc = run_cli(
        "train.py",
        "experiment=autoencoder_kl_f4",
        "scale=cpu",
        "trainer=fsdp_cpu",
        "trainer.max_steps=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "trainer=fsdp: AutoencoderModule cannot be sharded" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        [
            "trainer.precision=bf16-mixed",
            "trainer.strategy.param_dtype=bfloat16",
            "trainer.strategy.reduce_dtype=float32",
        ],
        ["model=edm"],
        ["experiment=ldm", "scale=cpu", "data=digits", "data.image_size=32", "sampler.steps=5"],
    ],
    ids=["bf16_policy", "edm", "ldm"],
)
def test_fsdp_trains_the_other_models_and_precisions(tmp_path, overrides):
    run_dir = train_run(tmp_path, "run", "trainer=fsdp_cpu", "trainer.max_steps=2", *overrides)
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2
    assert all(t.dtype == torch.float32 for t in checkpoint["state_dict"].values() if t.is_floating_point())
    assert (run_dir / "samples" / "samples.png").is_file()


@pytest.mark.slow
def test_a_16_bit_param_dtype_without_autocast_is_refused(tmp_path):
    proc = run_cli(
        "train.py", *FSDP_TINY, "trainer=fsdp_cpu", "trainer.strategy.param_dtype=bfloat16", "trainer.max_steps=1",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "trainer.strategy.param_dtype=bfloat16 needs trainer.precision=bf16-mixed" in proc.stderr

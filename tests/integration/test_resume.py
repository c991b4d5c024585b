"""Resuming from a checkpoint: bit-exact weights (mid-epoch and at an epoch boundary, both data paths), the metric
history of every logger kept, checkpoints from before the random state still resuming."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from difflab.callbacks.seeding import CHECKPOINT_KEY
from difflab.tasks.train import train
from tests.conftest import TINY, compose_config

# its module-scoped checkpoints are trained once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_resume")

# 96 training images in batches of 16: 6 steps an epoch. Every consumer of randomness is on: label dropout
# (p_uncond), network dropout, random flips, validation with sample grids between the epochs.
EXACT = [
    *TINY,
    "model=cfg",
    "model.p_uncond=0.2",
    "net.dropout=0.1",
    "data.random_flip=true",
    "data.limit_train_size=96",
    "trainer.limit_val_batches=1",
    "callbacks.sample_grid.every_n_epochs=1",
    "trainer.log_every_n_steps=1",
    "samples.num_samples=0",
    "logger=csv",
]


def fit(out: Path, *overrides: str) -> dict:
    return train(compose_config([*EXACT, *overrides], out))


def max_abs_diff(a: str, b: str) -> dict[str, float]:
    """Largest |difference| of the raw (``current_model_state``) and the EMA (``state_dict``) weights."""
    first, second = (torch.load(p, weights_only=True) for p in (a, b))
    assert first["global_step"] == second["global_step"]
    return {
        key: max((first[key][name] - second[key][name]).abs().max().item() for name in first[key])
        for key in ("current_model_state", "state_dict")
    }


# validation by steps (as experiment=quickstart): Lightning has not ended an epoch that max_steps stopped on its last
# batch, and re-enters it on resume
STEP_VAL = ("trainer.val_check_interval=4", "trainer.check_val_every_n_epoch=null")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """10 steps in one go, per data path and validation mode (made on first use)."""
    runs: dict[tuple, dict] = {}

    def run(on_device: str = "false", *extra: str) -> dict:
        if (on_device, extra) not in runs:
            out = tmp_path_factory.mktemp(f"full_{on_device}")
            runs[on_device, extra] = fit(out, "trainer.max_steps=10", f"data.on_device={on_device}", *extra)
        return runs[on_device, extra]

    return run


@pytest.mark.parametrize(
    "stop, on_device, extra",
    [(4, "false", ()), (6, "false", ()), (4, "true", ()), (6, "false", STEP_VAL), (6, "true", STEP_VAL)],
    ids=["mid_epoch", "epoch_boundary", "device_batches", "epoch_end_step_val", "epoch_end_step_val_device_batches"],
)
def test_resumed_run_equals_the_uninterrupted_run_bit_for_bit(uninterrupted, tmp_path, stop, on_device, extra):
    first = fit(tmp_path / "first", f"trainer.max_steps={stop}", f"data.on_device={on_device}", *extra)
    resumed = fit(
        tmp_path / "resumed",
        "trainer.max_steps=10",
        f"data.on_device={on_device}",
        *extra,
        f"ckpt_path={first['checkpoint']}",
    )
    assert max_abs_diff(uninterrupted(on_device, *extra)["checkpoint"], resumed["checkpoint"]) == {
        "current_model_state": 0.0,
        "state_dict": 0.0,
    }


def test_resume_from_a_periodic_checkpoint_of_a_longer_run_is_exact(uninterrupted, tmp_path):
    """As after a kill: the run went on past the checkpoint it is resumed from (step 3 of 8, mid-epoch)."""
    every_3 = [
        "callbacks.model_checkpoint.every_n_train_steps=3",
        "callbacks.model_checkpoint.every_n_epochs=null",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    first = fit(tmp_path / "first", "trainer.max_steps=8", *every_3)
    resumed = fit(
        tmp_path / "resumed", "trainer.max_steps=10", f"ckpt_path={tmp_path / 'first/checkpoints/step0000003.ckpt'}"
    )
    assert first["checkpoint"] and max(max_abs_diff(uninterrupted()["checkpoint"], resumed["checkpoint"]).values()) == 0


def test_an_epoch_cut_short_by_max_steps_continues_in_a_run_without_a_step_limit(tmp_path):
    """Stopped by max_steps at step 4 of a 6-step epoch, resumed with max_steps=-1 and max_epochs=2: Lightning
    counts the cut epoch as processed, so it would skip its last two batches and start epoch 1 (a data order the
    uninterrupted run never saw; weights 1e-3 off), and an iteration-based resume would stop one epoch early
    (difflab.callbacks.CutEpochRestore marks the epoch unfinished). Ends at step 12 with the same weights."""
    by_epochs = ("trainer.max_steps=-1", "trainer.max_epochs=2")
    uninterrupted = fit(tmp_path / "full", *by_epochs)
    first = fit(tmp_path / "first", "trainer.max_steps=4")
    resumed = fit(tmp_path / "resumed", *by_epochs, f"ckpt_path={first['checkpoint']}")
    assert torch.load(resumed["checkpoint"], weights_only=True)["global_step"] == 12
    assert max(max_abs_diff(uninterrupted["checkpoint"], resumed["checkpoint"]).values()) == 0


def test_a_checkpoint_without_random_state_resumes_with_a_warning(tmp_path):
    """Checkpoints written before the random state was saved still resume: reproducibly, not bit-exactly."""
    first = fit(tmp_path / "first", "trainer.max_steps=2")
    checkpoint = torch.load(first["checkpoint"], weights_only=True)
    del checkpoint[CHECKPOINT_KEY]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="has no random state"):
        resumed = fit(tmp_path / "resumed", "trainer.max_steps=4", f"ckpt_path={tmp_path / 'old.ckpt'}")
    assert torch.load(resumed["checkpoint"], weights_only=True)["global_step"] == 4


def logged_steps(metrics_csv: Path, key: str = "train/loss") -> list[int]:
    rows = list(csv.DictReader(metrics_csv.open()))
    return [int(row["step"]) for row in rows if row.get(key)]


def killed_after_checkpoint(out: Path, logger: str) -> Path:
    """A run that logged steps 0-5 but whose newest checkpoint is from step 4 (as when a kill follows a save)."""
    fit(out, "trainer.max_steps=6", f"logger={logger}", *EVERY_4)
    return out / "checkpoints" / "step0000004.ckpt"


EVERY_4 = [
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.model_checkpoint.every_n_epochs=null",
    "callbacks.model_checkpoint.save_top_k=-1",
]


def test_csv_history_is_kept_and_continued(tmp_path):
    """The resumed run's metrics.csv starts with the source run's history before the checkpoint (Lightning's writer
    would have deleted it); rows logged after the checkpoint (the part of the run it does not hold) are logged
    again, once. The source run's file is read, never written."""
    checkpoint = killed_after_checkpoint(tmp_path / "first", "csv")
    source = tmp_path / "first" / "csv" / "version_0" / "metrics.csv"
    before = source.read_bytes()
    fit(tmp_path / "resumed", "trainer.max_steps=8", f"ckpt_path={checkpoint}")
    metrics = tmp_path / "resumed" / "csv" / "version_0" / "metrics.csv"
    assert logged_steps(metrics) == list(range(8))  # 0-3 from the first run, 4-7 from the resumed one
    assert source.read_bytes() == before and logged_steps(source) == list(range(6))


def test_a_kill_right_after_a_step_checkpoint_loses_no_csv_row(tmp_path, monkeypatch):
    """The checkpoint of a step is written before Lightning logs that step's metrics: killed right after the save,
    the file lacks the row, and the resumed run (which starts at the next step) would never write it. The
    checkpoint carries the row and the resumed CSV logger writes it."""
    from difflab.utils.checkpoint_io import AtomicCheckpointIO

    save = AtomicCheckpointIO.save_checkpoint

    def killed_after_step_4(self, checkpoint, path, **kwargs):
        save(self, checkpoint, path, **kwargs)
        if Path(path).name == "step0000004.ckpt":
            raise SystemExit("killed")

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", killed_after_step_4)
    with pytest.raises(SystemExit):
        fit(tmp_path / "first", "trainer.max_steps=8", *EVERY_4)
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    metrics = tmp_path / "first" / "csv" / "version_0" / "metrics.csv"
    assert logged_steps(metrics) == [0, 1, 2]  # the row of step 3, the checkpoint's last, never reached the file
    checkpoint = tmp_path / "first" / "checkpoints" / "step0000004.ckpt"
    assert torch.load(checkpoint, weights_only=True)["difflab"]["unlogged_row"]["step"] == 3
    fit(tmp_path / "resumed", "trainer.max_steps=8", f"ckpt_path={checkpoint}")
    assert logged_steps(tmp_path / "resumed" / "csv" / "version_0" / "metrics.csv") == list(range(8))


class CsvOnDisk(pl.Callback):
    """Records the steps in ``path`` (metrics.csv) as they are on disk when training step ``step`` starts."""

    seen: list[int] = []

    def __init__(self, path: str, step: int) -> None:
        self.path, self.step = Path(path), step

    def on_train_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            CsvOnDisk.seen[:] = logged_steps(self.path) if self.path.is_file() else []


def test_the_history_up_to_a_checkpoint_is_on_disk_before_the_next_step(tmp_path):
    """What a kill after a save would leave: the CSV rows up to the checkpoint's step are on disk (Lightning flushes
    the loggers after every logged row), so the resumed run continues the history without a gap."""
    metrics = tmp_path / "csv" / "version_0" / "metrics.csv"
    snapshot = [f"+callbacks.snapshot._target_={__name__}.CsvOnDisk", f"+callbacks.snapshot.path={metrics}"]
    fit(tmp_path, "trainer.max_steps=6", *EVERY_4, *snapshot, "+callbacks.snapshot.step=5")  # saved at step 4
    assert CsvOnDisk.seen == [0, 1, 2, 3, 4]


def test_tensorboard_history_is_kept_and_continued(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    checkpoint = killed_after_checkpoint(tmp_path / "first", "tensorboard")
    fit(tmp_path / "resumed", "trainer.max_steps=8", "logger=tensorboard", f"ckpt_path={checkpoint}")
    for run, steps in (("resumed", range(8)), ("first", range(6))):  # the source's events stay as they were
        events = EventAccumulator(str(tmp_path / run / "tensorboard" / "version_0"))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == list(steps), run


def test_wandb_resumes_its_run_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    first = fit(tmp_path / "first", "trainer.max_steps=2", "logger=wandb")
    run_id = torch.load(first["checkpoint"], weights_only=True)["difflab"]["loggers"][0]["version"]
    resumed = fit(tmp_path / "resumed", "trainer.max_steps=4", "logger=wandb", f"ckpt_path={first['checkpoint']}")
    record = torch.load(resumed["checkpoint"], weights_only=True)["difflab"]["loggers"][0]
    assert record["class"] == "WandbLogger" and record["version"] == run_id
    assert list((tmp_path / "resumed" / "wandb").glob(f"offline-run-*-{run_id}"))


class FakeArtifactApi:
    """``wandb.Api`` offline: ``artifact(name, type).download(root)`` puts ``file`` in root as ``model.ckpt`` (the
    name Lightning's WandbLogger gives a logged checkpoint); ``error`` makes it fail as without a network."""

    def __init__(self, file: str | None = None, error: Exception | None = None) -> None:
        self.file, self.error, self.asked = file, error, []

    def __call__(self) -> FakeArtifactApi:
        return self

    def artifact(self, name: str, type: str):
        self.asked.append((name, type))
        if self.error:
            raise self.error
        api = self

        class Artifact:
            def download(self, root: str) -> str:
                Path(root).mkdir(parents=True, exist_ok=True)
                (Path(root) / "model.ckpt").write_bytes(Path(api.file).read_bytes())
                return root

        return Artifact()


def test_resume_from_a_wandb_model_artifact_is_exact(uninterrupted, tmp_path, monkeypatch):
    import wandb

    from difflab.utils.checkpoint_ref import fetch_checkpoint

    fetch_checkpoint.cache_clear()
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    first = fit(tmp_path / "first", "trainer.max_steps=4")
    api = FakeArtifactApi(first["checkpoint"])
    monkeypatch.setattr(wandb, "Api", api)
    ref = "wandb:me/difflab/model-abc123:latest"
    resumed = fit(tmp_path / "resumed", "trainer.max_steps=10", f"ckpt_path={ref}")
    assert api.asked == [("me/difflab/model-abc123:latest", "model")]
    assert (tmp_path / "cache" / "wandb_artifacts" / "me_difflab_model-abc123_latest" / "model.ckpt").is_file()
    assert max(max_abs_diff(uninterrupted()["checkpoint"], resumed["checkpoint"]).values()) == 0


def test_an_unreachable_wandb_artifact_says_what_to_do(tmp_path, monkeypatch):
    import wandb

    from difflab.utils.checkpoint_ref import fetch_checkpoint

    fetch_checkpoint.cache_clear()
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(wandb, "Api", FakeArtifactApi(error=ConnectionError("no network")))
    with pytest.raises(ValueError, match=r"ckpt_path=wandb:me/p/model-x:v3: could not fetch .*wandb artifact get"):
        fit(tmp_path / "run", "trainer.max_steps=1", "ckpt_path=wandb:me/p/model-x:v3")


@pytest.mark.slow
def test_two_process_ddp_resume_is_bit_exact(tmp_path):
    """Under 2-process CPU DDP: each rank's random stream and its share of the epoch order come back."""
    from tests.conftest import run_cli

    def launch(name: str, *extra: str) -> Path:
        run_dir = tmp_path / name
        proc = run_cli(
            "train.py", *EXACT, "trainer=ddp_cpu", f"hydra.run.dir={run_dir}", *extra, cwd=tmp_path, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return run_dir / "checkpoints" / "last.ckpt"

    full = launch("full", "trainer.max_steps=5")  # 96 images over 2 ranks: 3 steps an epoch
    first = launch("first", "trainer.max_steps=2")
    resumed = launch("resumed", "trainer.max_steps=5", f"ckpt_path={first}")
    assert max_abs_diff(str(full), str(resumed)) == {"current_model_state": 0.0, "state_dict": 0.0}
    states = torch.load(first, weights_only=True)[CHECKPOINT_KEY]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])  # one stream per rank


def test_resume_from_the_checkpoint_alone_is_exact_and_writes_nothing_into_the_source(uninterrupted, tmp_path, caplog):
    """`python src/train.py ckpt_path=<run>/checkpoints/last.ckpt` without the run's own overrides (EXACT here):
    the checkpoint's config and group choices are taken (the command line's defaults would be another model: 176
    lines of key mismatches), a key given on the command line wins and is reported, and the resumed run writes only
    into its own run dir."""
    import logging

    first = fit(tmp_path / "first", "trainer.max_steps=4")
    listing = {p: p.stat().st_mtime_ns for p in (tmp_path / "first").rglob("*")}
    with caplog.at_level(logging.INFO):
        resumed = train(compose_config([f"ckpt_path={first['checkpoint']}", "trainer.max_steps=10"], tmp_path / "r"))
    assert "resuming with the checkpoint's run config; from the command line: trainer.max_steps=10" in caplog.text
    assert max(max_abs_diff(uninterrupted()["checkpoint"], resumed["checkpoint"]).values()) == 0
    assert Path(resumed["checkpoint"]).parent == tmp_path / "r" / "checkpoints"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "first").rglob("*")} == listing  # nothing written there
    record = torch.load(resumed["checkpoint"], weights_only=True)["difflab"]
    assert record["config"]["net"]["model_channels"] == 16 and record["choices"]["data"] == "digits"
    assert record["config"]["callbacks"]["model_checkpoint"]["dirpath"] == str(tmp_path / "r" / "checkpoints")


def test_resume_refuses_another_experiment_and_takes_another_logger(tmp_path):
    """A group that sets keys everywhere (experiment=) is the run's method: another one is an error; a node group
    (logger=) is replaced."""
    first = fit(tmp_path / "first", "trainer.max_steps=2")
    with pytest.raises(ValueError, match="experiment=quickstart is not the checkpoint's run's experiment=None"):
        train(compose_config([f"ckpt_path={first['checkpoint']}", "experiment=quickstart"], tmp_path / "a"))
    cfg = compose_config(
        [f"ckpt_path={first['checkpoint']}", "logger=tensorboard", "trainer.max_steps=3"], tmp_path / "b"
    )
    resumed = train(cfg)
    record = torch.load(resumed["checkpoint"], weights_only=True)["difflab"]
    assert [entry["class"] for entry in record["loggers"]] == ["TensorBoardLogger"]
    assert record["choices"]["logger"] == "tensorboard" and record["config"]["net"]["model_channels"] == 16


def test_a_checkpoint_without_recorded_choices_resumes_from_its_stored_config(uninterrupted, tmp_path, caplog):
    """A checkpoint written before the group choices were recorded (the benchmark's and the studies' older runs):
    the short command resumes it from its stored config, exactly, instead of the command line's defaults (a
    different model: 176 lines of key mismatches); with a config group on the command line (the run's original
    command) the command line's config is used, as before."""
    import logging

    first = fit(tmp_path / "first", "trainer.max_steps=4")
    old = torch.load(first["checkpoint"], weights_only=True)
    del old["difflab"]["choices"]
    torch.save(old, tmp_path / "old.ckpt")
    with caplog.at_level(logging.WARNING):
        resumed = train(compose_config([f"ckpt_path={tmp_path / 'old.ckpt'}", "trainer.max_steps=10"], tmp_path / "r"))
    assert "does not record its config groups: resuming with its stored config" in caplog.text
    assert max(max_abs_diff(uninterrupted()["checkpoint"], resumed["checkpoint"]).values()) == 0
    again = fit(tmp_path / "again", "trainer.max_steps=10", f"ckpt_path={tmp_path / 'old.ckpt'}")
    assert max(max_abs_diff(uninterrupted()["checkpoint"], again["checkpoint"]).values()) == 0
    assert "resuming with the command line's config (data=digits" in caplog.text

"""Writing checkpoints: last.ckpt before step*.ckpt, a full disk fails clearly with the previous checkpoint intact,
and kill -9 at random moments never leaves a partial file or a last.ckpt older than a step file."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from difflab.callbacks.checkpoint import CheckpointWriteError
from difflab.tasks.train import train
from difflab.utils import checkpoint_io
from tests.conftest import ROOT, TINY, compose_config

EVERY_2 = [
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.every_n_epochs=null",
    "trainer.limit_val_batches=0",
    "samples.num_samples=0",
]


def test_last_ckpt_is_written_before_the_step_file(tmp_path, monkeypatch):
    """So a kill between the two writes leaves last.ckpt newer than every step*.ckpt, never older."""
    written: list[str] = []
    save = checkpoint_io.AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(
        checkpoint_io.AtomicCheckpointIO,
        "save_checkpoint",
        lambda self, checkpoint, path, **kw: (
            written.append(f"{Path(path).name}@{checkpoint['global_step']}") or save(self, checkpoint, path, **kw)
        ),
    )
    train(compose_config([*TINY, *EVERY_2, "trainer.max_steps=5"], tmp_path))
    assert written == [
        "last.ckpt@2",
        "step0000002.ckpt@2",
        "last.ckpt@4",
        "step0000004.ckpt@4",
        "last.ckpt@5",  # the final save when max_steps stops the run between two scheduled saves
    ]


class FullDisk:
    """A file on a disk with ``room`` bytes left: writes past it fail with ENOSPC, as the kernel's do. torch.save's
    zip writer then ends in ``RuntimeError: [enforce fail at inline_container.cc]`` with the OSError only as its
    context: what a user saw instead of "no space left on device"."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    save = torch.save

    def disk_full_from_step_4(obj, file, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step", 0) >= 4:
            file = FullDisk(file, room=1000)
        return save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_from_step_4)
    with pytest.raises(CheckpointWriteError) as info:
        train(compose_config([*TINY, *EVERY_2, "trainer.max_steps=6"], tmp_path))
    message = str(info.value)
    checkpoints = tmp_path / "checkpoints"
    assert f"checkpoint {checkpoints / 'last.ckpt'} could not be written (No space left on device" in message
    assert "the file already there, if any, is unchanged" in message
    monkeypatch.setattr(torch, "save", save)
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step0000002.ckpt"]  # no temporary file


def test_torch_saves_error_on_a_full_disk_names_the_cause_and_the_file(tmp_path, monkeypatch):
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, file: save(obj, FullDisk(file, room=1000)))
    target = tmp_path / "pairs.pt"
    with pytest.raises(OSError, match=f"No space left on device .*writing {target}") as info:
        checkpoint_io.AtomicCheckpointIO().save_checkpoint({"x": torch.zeros(10_000)}, target)
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_a_full_disk_while_the_file_is_put_in_place_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Lightning's own save writes into the system temp directory and moves the file into place: across filesystems
    (a tmpfs /tmp) that move is a copy into last.ckpt itself, and a full disk during it left a truncated last.ckpt.
    Ours writes beside the target and renames: nothing is copied into place."""
    import shutil
    import tempfile

    other = Path("/dev/shm")
    if not (other.is_dir() and os.access(other, os.W_OK) and other.stat().st_dev != tmp_path.stat().st_dev):
        pytest.skip("needs a second writable filesystem (/dev/shm) for the system temp directory")
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    copyfile = shutil.copyfile

    def disk_full_mid_copy(src, dst, *args, **kwargs):
        if Path(dst).name == "last.ckpt" and Path(dst).exists():  # a later save of last.ckpt: fill the disk
            Path(dst).write_bytes(Path(src).read_bytes()[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return copyfile(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", disk_full_mid_copy)
    train(compose_config([*TINY, *EVERY_2, "trainer.max_steps=6"], tmp_path))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6


KILL_TRIALS = 20


@pytest.mark.slow
def test_kill_9_during_checkpoint_writes_never_leaves_a_bad_file(tmp_path):
    """20 runs saving after every step (a 4M-parameter net: each save takes a while) killed at random moments."""
    args = [
        *TINY,
        "net.model_channels=64",
        "callbacks.model_checkpoint.every_n_train_steps=1",
        "callbacks.model_checkpoint.every_n_epochs=null",
        "trainer.max_steps=1000",
        "trainer.limit_val_batches=0",
        "logger=none",
    ]
    env = {**os.environ, "DIFFLAB_ROOT": str(tmp_path)}
    rng = random.Random(0)
    mid_write = 0  # trials killed while a file was being written (its temporary file is left behind)
    for trial in range(KILL_TRIALS):
        run_dir = tmp_path / f"trial{trial}"
        checkpoints = run_dir / "checkpoints"
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "src" / "train.py"), *args, f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while not (checkpoints / "last.ckpt").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        files = sorted(checkpoints.glob("*.ckpt"))
        steps = {p.name: torch.load(p, weights_only=True)["global_step"] for p in files}  # every one loads
        assert "last.ckpt" in steps, f"trial {trial}: {steps}"
        newest_step_file = max((s for name, s in steps.items() if name != "last.ckpt"), default=0)
        assert steps["last.ckpt"] >= newest_step_file, f"trial {trial}: last.ckpt older than a step file: {steps}"
        mid_write += bool(list(checkpoints.glob(".*.tmp")))
    assert mid_write > 0, "no kill landed during a write: the test did not test anything"


def test_written_files_get_the_usual_permissions(tmp_path):
    """Through a temporary file (mkstemp: 0600) but with the mode open() would give (0666 minus the umask)."""
    from difflab.utils.paths import write_text_atomic

    umask = os.umask(0)
    os.umask(umask)
    assert (write_text_atomic(tmp_path / "a.json", "{}").stat().st_mode & 0o777) == 0o666 & ~umask

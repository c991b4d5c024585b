"""A 2-"node" × 1-process job on localhost, launched as on a cluster: two torchrun agents meet at a c10d rendezvous;
every process runs Hydra itself. The job has one run dir (named after the rendezvous id), one logger run, one
checkpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from difflab.utils.checkpoint_io import load_checkpoint
from tests.conftest import TINY, TINY_DIT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_job(root: Path, trainer: str, *overrides: str) -> list[subprocess.CompletedProcess]:
    """The README's torchrun command on two "nodes" of this machine (two agents, one process each)."""
    port, torchrun = free_port(), Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job42",
        str(Path(__file__).resolve().parents[2] / "src" / "train.py"),
        *overrides, trainer, "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
    ]  # fmt: skip
    env = {**os.environ, "DIFFLAB_ROOT": str(root), "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]  # fmt: skip
    results = []
    for agent in agents:
        out, _ = agent.communicate(timeout=400)
        results.append(subprocess.CompletedProcess(command, agent.returncode, out, ""))
    return results


def check_one_run(root: Path, results: list[subprocess.CompletedProcess], steps: int) -> Path:
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    runs = list((root / "logs" / "train" / "runs").iterdir())
    assert [r.name for r in runs] == ["torchrun-job42"]  # one run dir, shared by both nodes
    run = runs[0]
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]  # one logger run
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert checkpoints == ["last.ckpt", f"step{steps:07d}.ckpt"]  # one checkpoint (and its step copy)
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == steps
    assert (run / "samples" / "samples.png").is_file()
    return run


def test_two_node_ddp_job_on_localhost(tmp_path):
    results = two_node_job(tmp_path, "trainer=ddp_cpu", *TINY, "trainer.max_steps=3")
    check_one_run(tmp_path, results, 3)
    assert any("MEMBER: 2/2" in r.stdout for r in results)


@pytest.mark.slow
def test_two_node_fsdp_job_on_localhost(tmp_path):
    results = two_node_job(tmp_path, "trainer=fsdp_cpu", *TINY_DIT, "trainer.max_steps=3")
    run = check_one_run(tmp_path, results, 3)
    assert (run / "checkpoints" / "last.ckpt").is_symlink()  # sharded: both nodes wrote their pieces
    assert len(list((run / "checkpoints" / "last.ckpt" / "shards").iterdir())) == 2

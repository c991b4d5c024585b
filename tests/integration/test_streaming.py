"""Training on ``data=streaming``: the same run as on the in-memory set the shards came from, bit-exact mid-epoch
resume (tests/integration/test_resume.py's comparison, on shards), each item once per epoch under real 2-process
CPU DDP, and the README's commands (``src/stream.py``, then ``src/train.py data=streaming``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from difflab.tasks.stream import stream
from difflab.tasks.train import train
from tests.conftest import ROOT, TINY, cli_ok, compose_config, run_cli
from tests.integration.test_resume import EXACT, max_abs_diff
from tests.unit.test_streaming import write_indexed

pytestmark = pytest.mark.xdist_group("test_streaming")  # module-scoped shards and runs: one worker


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    """``src/stream.py data=digits``: the shards of the set TINY trains on (16x16, its val split)."""
    out = tmp_path_factory.mktemp("digits_shards")
    stream(compose_config(["data=digits", f"out_dir={out}"], out, config_name="stream"))
    return out


def streaming(shards: Path, *overrides: str) -> list[str]:
    """test_resume's EXACT run (cfg with label dropout, network dropout, random flips, sample grids) on the shards."""
    exact = [o for o in EXACT if o != "data=digits"]
    return [*exact, "data=streaming", f"data.input_dir={shards}", "data.image_size=16", *overrides]


def fit(out: Path, overrides: list[str]) -> dict:
    return train(compose_config(overrides, out))


def test_a_streamed_run_equals_the_in_memory_run_bit_for_bit(digits_shards, tmp_path):
    """Item i of the shards is item i of the digits train split, and the order is the same function of (seed,
    epoch): 7 steps (an epoch boundary at 6) give the same weights."""
    in_memory = fit(tmp_path / "memory", [*EXACT, "trainer.max_steps=7", "data.on_device=false"])
    streamed = fit(tmp_path / "streamed", streaming(digits_shards, "trainer.max_steps=7"))
    assert max_abs_diff(in_memory["checkpoint"], streamed["checkpoint"]) == {
        "current_model_state": 0.0,
        "state_dict": 0.0,
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_streaming_run_equals_the_uninterrupted_run_bit_for_bit(digits_shards, tmp_path, workers):
    """Stopped at step 4 (mid-epoch: 6 steps an epoch) and resumed from its checkpoint to step 8, as 8 in one go."""
    run = [f"data.num_workers={workers}"]
    full = fit(tmp_path / "full", streaming(digits_shards, "trainer.max_steps=8", *run))
    first = fit(tmp_path / "first", streaming(digits_shards, "trainer.max_steps=4", *run))
    resumed = fit(
        tmp_path / "resumed",
        streaming(digits_shards, "trainer.max_steps=8", *run, f"ckpt_path={first['checkpoint']}"),
    )
    assert torch.load(first["checkpoint"], weights_only=True)["global_step"] == 4
    assert max_abs_diff(full["checkpoint"], resumed["checkpoint"]) == {"current_model_state": 0.0, "state_dict": 0.0}


class RecordItems(pl.Callback):
    """Writes ``<path>/rank<r>.json``: [epoch, labels of the batch] for every training batch this rank received."""

    def __init__(self, path: str) -> None:
        self.path, self.seen = Path(path), []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module, batch, batch_idx: int) -> None:
        self.seen.append([trainer.current_epoch, batch[1].tolist()])

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def test_two_process_ddp_sees_each_item_once_per_epoch(tmp_path):
    """Real 2-process CPU DDP (``trainer=ddp_cpu``) with 2 loader workers per rank, on 100 items labelled with their
    index, batches of 16: each rank gets 50 items, 3 batches; each epoch the ranks' 96 items are distinct, and the 4
    left out (each rank's incomplete batch) change from epoch to epoch. Lightning kept our sampler (its own
    DistributedSampler would have split each rank's share again: 24 items a rank, not 48)."""
    shards = write_indexed(tmp_path / "shards", n_train=100, n_val=20, shape=(1, 16, 16))
    record = tmp_path / "record"
    tiny = [o for o in TINY if o not in ("data=digits", "trainer=cpu")]
    overrides = [
        *tiny,
        "data=streaming",
        f"data.input_dir={shards}",
        "data.image_size=16",
        "data.num_workers=2",
        "trainer=ddp_cpu",
        "trainer.max_steps=9",  # 3 epochs
        "trainer.check_val_every_n_epoch=1",
        "samples.num_samples=0",
        "callbacks.sample_grid=null",
        f"+callbacks.record._target_={__name__}.RecordItems",
        f"+callbacks.record.path={record}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    cli_ok(run_cli("train.py", *overrides, cwd=tmp_path, timeout=600, env={"PYTHONPATH": str(ROOT)}))
    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in range(2)]
    dropped = []
    for epoch in range(3):
        per_rank = [[i for e, batch in seen if e == epoch for i in batch] for seen in ranks]
        assert [len(items) for items in per_rank] == [48, 48]
        union = per_rank[0] + per_rank[1]
        assert len(set(union)) == 96, f"epoch {epoch}: an item came twice"
        dropped.append(set(range(100)) - set(union))
    assert dropped[0] != dropped[1] != dropped[2]


def test_the_readme_commands_write_then_train(tmp_path):
    """`python src/stream.py data=digits out_dir=DIR`, then the training command it prints (quickstart's settings on
    the shards, a few steps; its val_size=512 caps the val split)."""
    shards = tmp_path / "shards"
    written = cli_ok(run_cli("stream.py", "data=digits", f"out_dir={shards}", cwd=tmp_path))
    command = next(line for line in written.stderr.splitlines() + written.stdout.splitlines() if "src/train.py" in line)
    assert f"data=streaming data.input_dir={shards} data.channels=1 data.image_size=16" in command
    assert json.loads((shards / "manifest.json").read_text())["splits"]["train"]["items"] == 1437
    run = [
        "experiment=quickstart",
        "data=streaming",
        f"data.input_dir={shards}",
        "data.image_size=16",
        "net.model_channels=16",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "samples.num_samples=4",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    cli_ok(run_cli("train.py", *run, cwd=tmp_path, timeout=600))
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    data = checkpoint["difflab"]["config"]["data"]
    assert data["_target_"] == "difflab.data.StreamingDataModule" and data["val_size"] == 512
    assert checkpoint["global_step"] == 3

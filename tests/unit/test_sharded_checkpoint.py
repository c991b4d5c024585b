"""The sharded checkpoint format: boxes read across pieces, consolidation, optimizer layout conversion, atomic
replacement, and the errors for damaged checkpoints (one process; the 2-process runs are in
tests/integration/test_fsdp.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from difflab.utils import sharded_checkpoint as sc
from difflab.utils.checkpoint_io import load_checkpoint


def write_by_hand(root, full: torch.Tensor, cuts: list[int], meta: dict) -> None:
    """A checkpoint whose tensor ``("state_dict", "w")`` = ``full`` is split at rows ``cuts`` over len(cuts)+1 files,
    as that many processes would have written it."""
    (root / sc.SHARDS).mkdir(parents=True)
    bounds, pieces = [0, *cuts, full.shape[0]], []
    for rank, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
        file = f"{sc.SHARDS}/rank-{rank:05d}.safetensors"
        save_file({"t0": full[lo:hi].contiguous()}, str(root / file))
        pieces.append({"file": file, "key": "t0", "offset": [lo, 0], "shape": [hi - lo, full.shape[1]]})
    entry = {"path": ["state_dict", "w"], "shape": list(full.shape), "dtype": "float32", "pieces": pieces}
    (root / sc.INDEX).write_text(json.dumps({"format": sc.FORMAT, "world_size": len(pieces), "tensors": [entry]}))
    torch.save({**meta, "state_dict": {"w": sc.SHARDED, "b": torch.ones(2)}}, root / sc.META)


def test_boxes_are_read_across_pieces_and_consolidated(tmp_path):
    full = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    write_by_hand(tmp_path, full, [3, 5], {"global_step": 4})
    reader = sc.ShardedCheckpointReader(tmp_path, lambda p: torch.load(p, weights_only=True))
    assert reader.world_size == 3
    for lo, hi in [(0, 7), (2, 6), (3, 5), (6, 7), (1, 2)]:  # boxes within one piece and spanning two or three
        assert torch.equal(reader.read(("state_dict", "w"), [lo, 0], [hi - lo, 3]), full[lo:hi])
    assert torch.equal(reader.read(("state_dict", "w"), [0, 1], [7, 2]), full[:, 1:])
    whole = load_checkpoint(tmp_path)  # what sample.py / eval.py / export.py open
    assert whole["global_step"] == 4 and torch.equal(whole["state_dict"]["w"], full)
    assert torch.equal(whole["state_dict"]["b"], torch.ones(2))
    record_only = load_checkpoint(tmp_path, consolidate=False)  # what resume reads for the run record
    assert record_only["global_step"] == 4 and record_only["state_dict"]["w"] == sc.SHARDED


def test_a_missing_or_short_shard_is_an_error_naming_the_checkpoint(tmp_path):
    write_by_hand(tmp_path, torch.zeros(4, 2), [2], {})
    (tmp_path / sc.SHARDS / "rank-00001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"ckpt=.*missing shard file shards/rank-00001.safetensors"):
        load_checkpoint(tmp_path)
    index = json.loads((tmp_path / sc.INDEX).read_text())
    index["tensors"][0]["pieces"].pop()
    (tmp_path / sc.INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="cover 4 of its 8 elements"):
        load_checkpoint(tmp_path)
    (tmp_path / sc.INDEX).write_text(json.dumps({**index, "format": "other/9"}))
    with pytest.raises(ValueError, match="expected 'difflab-sharded-checkpoint/1'"):
        load_checkpoint(tmp_path)


def test_optimizer_states_by_name_become_torch_layout():
    checkpoint = {
        "optimizer_states": [
            {
                "state": {"net.b": {"exp_avg": torch.ones(1)}, "net.a": {"exp_avg": torch.zeros(1)}},
                "param_groups": [{"lr": 0.1, "params": ["net.a", "net.b"]}, {"lr": 0.2, "params": ["net.c"]}],
            }
        ]
    }
    converted = sc.optimizer_states_by_index(checkpoint)["optimizer_states"][0]
    assert [g["params"] for g in converted["param_groups"]] == [[0, 1], [2]]
    assert converted["param_groups"][1]["lr"] == 0.2
    assert torch.equal(converted["state"][1]["exp_avg"], torch.ones(1)) and set(converted["state"]) == {0, 1}


@pytest.fixture
def one_process_group(tmp_path_factory):
    """A gloo group of this one process through a file store: no port, and nothing in the environment (a
    MASTER_PORT left in the test worker's environment reaches the DDP runs it starts later)."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path_factory.mktemp('group') / 'store'}", rank=0, world_size=1
    )
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_save_is_atomic_and_replaces_the_previous_copy(tmp_path, one_process_group, monkeypatch):
    weight = distribute_tensor(torch.randn(5, 4), one_process_group, [Shard(0)])
    path = tmp_path / "last.ckpt"
    first = sc.save_sharded_checkpoint({"state_dict": {"w": weight}, "global_step": 1}, path, 0, 1)
    assert path.is_symlink() and path.resolve() == first.resolve()
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], weight.full_tensor())

    def killed(*args, **kwargs):  # the process dies while writing its shard
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sc, "save_file", killed)
    with pytest.raises(OSError, match="No space left"):
        sc.save_sharded_checkpoint({"state_dict": {"w": weight * 2}, "global_step": 2}, path, 0, 1)
    assert load_checkpoint(path)["global_step"] == 1  # the previous checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, first.name])  # no partial copy left
    monkeypatch.undo()
    second = sc.save_sharded_checkpoint({"state_dict": {"w": weight * 2}, "global_step": 2}, path, 0, 1)
    assert load_checkpoint(path)["global_step"] == 2
    assert not first.exists() and second.exists()  # the old copy is removed once the link points at the new one
    sc.remove_sharded_checkpoint(path)
    assert not path.exists() and not second.exists()

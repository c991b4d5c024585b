"""experiments/feature_net_v2/rescore.py end to end on a tiny checkpoint: every cell is scored with both feature nets
on the same samples, the floor is there, a missing checkpoint is skipped, and a rerun keeps the cells already done and
draws only the new one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from difflab.tasks.train import train
from tests.conftest import TINY, compose_config, load_experiment

rescore = load_experiment("feature_net_v2/rescore")
SHORT = ["trainer.max_steps=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0"]


def test_rescore_runs_on_both_nets(tmp_path, monkeypatch, capsys):
    ckpt = Path(train(compose_config([*TINY, *SHORT], tmp_path / "train"))["checkpoint"])
    logs = tmp_path / "logs"
    (logs / "tiny" / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, logs / "tiny" / "checkpoints" / "last.ckpt")
    Cell = rescore.Cell
    cells = [Cell("toy", "ddim 4", "tiny", "ddim", 4), Cell("toy", "ancestral 4", "tiny", "ddpm", 4)]
    monkeypatch.setattr(rescore, "OUT", tmp_path)
    monkeypatch.setattr(rescore, "CELLS", [*cells, Cell("toy", "absent", "nowhere")])
    argv = ["--num-samples", "4", "--num-real", "16", "--batch-size", "4", "--logs", str(logs)]
    rescore.main(argv)

    result = json.loads((tmp_path / "results_rescore.json").read_text())
    assert result["settings"]["nets"] == rescore.NETS == ["fmnist_cls", "fmnist_cls_v2"]
    assert set(result["test_accuracy"]) == set(rescore.NETS)
    rows = result["rows"]
    assert [(r["study"], r["cell"]) for r in rows] == [
        ("floor", "4 test images, 1x16x16"),
        ("toy", "ddim 4"),
        ("toy", "ancestral 4"),
    ]
    for row in rows:
        for net in rescore.NETS:
            assert row[f"fid_{net}"] >= 0 and row[f"is_{net}"] >= 1
    assert 0 <= rows[0]["accuracy_fmnist_cls_v2"] <= 1  # the floor has the test labels
    assert rows[1]["fid_fmnist_cls"] != rows[1]["fid_fmnist_cls_v2"]  # two nets, the same images
    out = capsys.readouterr().out
    assert "skipped toy / absent" in out and "| toy | ddim 4 |" in out

    monkeypatch.setattr(rescore, "CELLS", [*cells, Cell("toy", "ddim 2", "tiny", "ddim", 2)])
    rescore.main(argv)  # a rerun with the same settings draws only the new cell
    rows2 = json.loads((tmp_path / "results_rescore.json").read_text())["rows"]
    assert rows2[:3] == rows and [r["cell"] for r in rows2[3:]] == ["ddim 2"]
    assert len(list((logs / "feature_net_v2" / "samples").glob("*.pt"))) == 3  # one sample set per cell drawn

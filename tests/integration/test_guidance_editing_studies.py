"""experiments/guidance_editing (inpainting, cascade): the training commands compose, the masks are what the
RESULTS say, and both scripts run end to end on tiny checkpoints (writing into a temporary folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from difflab.tasks.train import train
from tests.conftest import TINY, TINY_UPSCALER, compose_config, load_experiment

inpainting = load_experiment("guidance_editing/inpainting")
cascade = load_experiment("guidance_editing/cascade")
SHORT = ["trainer.max_steps=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0"]


def trained(overrides: list[str], run_dir: Path, tmp: Path) -> Path:
    """A tiny run whose last.ckpt lies where the study's ensure_checkpoint looks for it."""
    ckpt = Path(train(compose_config([*TINY, *SHORT, *overrides], tmp))["checkpoint"])
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, run_dir / "checkpoints" / "last.ckpt")
    return run_dir


@pytest.mark.parametrize("scale", sorted(cascade.SCALES))
def test_cascade_training_commands_compose(scale, tmp_path):
    sizes = {}
    for name, (_, overrides) in cascade.SCALES[scale].items():
        cfg = compose_config(overrides.split(), tmp_path)
        sizes[name] = cfg.data.image_size
        if name == "upscaler":
            assert cfg.model.low_res_size == sizes["base"] and cfg.model._target_.endswith("UpscalerModule")
    assert sizes["upscaler"] == sizes["single"] == 2 * sizes["base"]
    assert compose_config(inpainting.SIMPLE.split(), tmp_path).data.image_size == 16


def test_inpainting_masks():
    centre = inpainting.holes("centre", 3, 16, 0)
    assert centre.shape == (3, 1, 16, 16) and centre.mean() == 0.25
    random = inpainting.holes("random", 200, 16, 0)
    assert abs(random.mean().item() - 0.5) < 0.02 and not (random[0] == random[1]).all()
    assert (random[:, :, ::2, ::2] == random[:, :, 1::2, 1::2]).all()  # 2x2 blocks


def test_inpainting_study_runs(tmp_path, monkeypatch):
    run_dir = trained([], tmp_path / "base", tmp_path / "train")
    monkeypatch.setattr(inpainting, "OUT", tmp_path)
    monkeypatch.setattr(inpainting, "ROWS", [("plain", 4, 1, 1), ("repaint", 4, 2, 2)])
    inpainting.main(["--run-dir", str(run_dir), "--num-images", "4", "--num-real", "16", "--batch-size", "4"])
    rows = json.loads((tmp_path / "results_inpainting_cpu.json").read_text())["rows"]
    assert [(r["mask"], r["nfe"]) for r in rows] == [("centre", 4), ("centre", 6), ("random", 4), ("random", 6)]
    assert all(r["known_exact"] for r in rows) and (tmp_path / "inpainting_cpu.png").is_file()
    monkeypatch.setattr(inpainting, "PAPER_ROWS", [("paper", 4, 2, 2)])
    args = ["--run-dir", str(run_dir), "--num-images", "4", "--num-real", "16", "--batch-size", "4"]
    inpainting.main([*args, "--paper", "--tag", "paper", "--rows", "0"])
    rows = json.loads((tmp_path / "results_inpainting_paper.json").read_text())["rows"]
    assert [(r["method"], r["nfe"]) for r in rows] == [("paper", 6), ("paper", 6)]  # centre, random


def test_cascade_study_runs(tmp_path, monkeypatch):
    dirs = {
        "base": trained([], tmp_path / "base", tmp_path / "t0"),
        "upscaler": trained(TINY_UPSCALER[len(TINY) :], tmp_path / "up", tmp_path / "t1"),
        "single": trained(
            ["data.image_size=32", "net.attention_resolutions=[16]"], tmp_path / "single", tmp_path / "t2"
        ),
    }
    monkeypatch.setattr(cascade, "OUT", tmp_path)
    monkeypatch.setitem(cascade.SCALES, "cpu", {name: (d, "") for name, d in dirs.items()})
    cascade.main(["--num-samples", "3", "--num-real", "16", "--batch-size", "3", "--aug-levels", "2", "0"])
    result = json.loads((tmp_path / "results_cascade_cpu.json").read_text())
    assert [r["model"] for r in result["rows"]] == [
        "test images (the FID floor at this sample count)",
        "single model",
        "base, bilinear upsampling",
        "cascade, aug level 2",
        "cascade, aug level 0",
    ]
    compute = result["compute"]
    assert compute["upscaler"]["gflops"] > compute["single"]["gflops"] > 0  # the extra input channel
    assert result["rows"][3]["train_tmac"] == pytest.approx(
        compute["base"]["train_tmac"] + compute["upscaler"]["train_tmac"], abs=0.1
    )
    cascade.main(
        [
            "--num-samples",
            "3",
            "--num-real",
            "16",
            "--batch-size",
            "3",
            "--aug-levels",
            "2",
            "--upscaler-on-test",
            "--tag",
            "t",
        ]
    )
    rows = json.loads((tmp_path / "results_cascade_t.json").read_text())["rows"]
    assert [r["model"] for r in rows][1:] == [
        "test images' low-res, bilinear",
        "upscaler on the test images' low-res, aug level 2",
    ]

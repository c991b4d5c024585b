"""experiments/arch_sweep: every (scale, space, net) of the study composes with its own net presets, the CPU-scale
nets take their data's shapes, and the report reads sweep dirs into records with DiT's training compute."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from difflab.utils.sweep_summary import write_run_summary
from tests.conftest import compose_config, load_experiment

run = load_experiment("arch_sweep/run")
CELLS = [
    (scale, space, net) for scale in run.SPACES for space in run.SPACES[scale] for net in run.SPACES[scale][space][1]
]


@pytest.mark.parametrize("scale, space, net", CELLS)
def test_every_cell_composes(scale, space, net, tmp_path):
    model, _ = run.SPACES[scale][space]
    cfg = compose_config([f"hydra.searchpath=[file://{run.CONF}]", *run.COMMON[scale], *model, f"net={net}"], tmp_path)
    assert cfg.net._target_.endswith("DiT" if net.startswith("dit") else "UNet")
    if scale == "cpu":  # the study's own presets fit their data: 16x16x1 pixels, 8x8x3 latents
        shape = (1, 16) if space == "pixel" else (3, 8)
        instantiate(cfg.net)(in_channels=shape[0], out_channels=shape[0], image_size=shape[1], num_classes=None)


def test_results_read_the_sweeps(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "sweep_dir", lambda scale, space: tmp_path / space)
    for space, net, fid in (("pixel", "dit_xs2", 40.0), ("latent", "unet_latent32", 20.0)):
        job = tmp_path / space / "0"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- model=ddpm\n- net={net}\n")
        metrics = {"final/fid_fmnist_cls": fid, "final/kid_fmnist_cls": 0.5, "val/loss": 0.1}
        write_run_summary(job, metrics=metrics, params=2_000_000, gflops_per_forward=0.05, train_images=22400)
    records = run.results("cpu")
    assert [(r["space"], r["net"], r["family"], r["fid"]) for r in records] == [
        ("pixel", "dit_xs2", "DiT", 40.0),
        ("latent", "unet_latent32", "UNet", 20.0),
    ]
    assert records[0]["train_tflops"] == pytest.approx(3 * 0.05 * 22400 / 1e3) and records[0]["params_m"] == 2.0
    assert "| pixel | dit_xs2 | 2.000 | 0.050 | 3.360 |" in run.table(records)

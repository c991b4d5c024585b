"""experiments/score_sde: its training commands compose as the RESULTS say, and run.py and plot.py run end to end on
tiny checkpoints of each model (writing into a temporary folder)."""

from __future__ import annotations

import json
import shutil

from difflab.tasks.train import train
from tests.conftest import TINY, compose_config, load_experiment

study = load_experiment("score_sde/run")
plot = load_experiment("score_sde/plot")
# the σ processes have no discrete T; 16x16 images, as the study's Fashion-MNIST test set
BASE = [o for o in TINY if not o.startswith("schedule.")] + ["data.image_size=16", "net.attention_resolutions=[8]"]
SHORT = ["trainer.max_steps=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0", "samples.num_samples=0"]


def test_the_models_compose_as_described(tmp_path):
    for name, overrides in study.MODELS.items():
        cfg = compose_config(["experiment=quickstart", *overrides], tmp_path)
        assert cfg.trainer.max_steps == 900 and cfg.net.model_channels == 32, name
        edm = name in ("edm", "ve", "vp_sde")
        assert cfg.model._target_.endswith("EDMModule" if edm else "DiffusionModule"), name
    assert compose_config(["experiment=quickstart", *study.MODELS["ve"]], tmp_path).schedule.preconditioning == "ve"


def test_the_study_runs_on_tiny_models(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    for name, overrides in study.MODELS.items():
        run = logs / "tiny" / f"{name}_s0"
        ckpt = train(compose_config([*BASE, *SHORT, *overrides], tmp_path / "train" / name))["checkpoint"]
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(ckpt, run / "checkpoints" / "last.ckpt")
        (run / "run_summary.json").write_text("{}")  # a finished run: ensure_checkpoint trains nothing
    monkeypatch.setattr(study, "LOGS", logs)
    monkeypatch.setattr(study, "OUT", tmp_path)
    monkeypatch.setattr(plot, "HERE", tmp_path)
    monkeypatch.setattr(study, "NFE_CELLS", {"heun 2": ("heun", {"sigma_max": None}, 2)})
    monkeypatch.setattr(study, "PC_CELLS", {"PC": ("pc", {}, 2), "Langevin": ("langevin", {"n_steps_each": 1}, 2)})
    sizes = ["--num-samples", "4", "--pc-samples", "4", "--num-real", "16", "--batch-size", "4", "--nll-images", "2"]
    study.main(["--tag", "tiny", *sizes, "--nll-rtol", "1e-2", "--feature-nets", "fmnist_cls"])
    rows = json.loads((tmp_path / "results_tiny.json").read_text())["rows"]
    assert {(r["part"], r["model"]) for r in rows if r["part"] != "nll"} == {
        *(("nfe", m) for m in ("ddpm_eps", "ddpm_v", "edm")),
        *(("pc", m) for m in ("ve", "vp_sde")),
    }
    nll = {(r["model"], r["sampler"]): r for r in rows if r["part"] == "nll"}
    assert set(nll) == {(m, "ode") for m in study.MODELS} | {(m, "vlb") for m in study.VLB_MODELS}
    assert all(r["bpd"] > 0 and r["bpd_se"] >= 0 for r in nll.values())
    assert [r["nfe"] for r in rows if r["part"] == "pc"] == [4, 3] * 2  # 2 levels x (1 + 1); 2 x 1 + 1
    plot.main(["--tag", "tiny"])
    assert all((tmp_path / f"{kind}_tiny.png").is_file() for kind in ("fid_vs_nfe", "pc", "nll"))

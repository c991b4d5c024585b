"""experiments/few_step: run.py end to end on a tiny teacher and tiny students of each method (into a temporary
folder): every part makes its cells at every seed, with FID on both feature nets and the students' training cost
(reflow's with the network evaluations of its pairs)."""

from __future__ import annotations

import json
import shutil

from difflab.tasks.train import train
from tests.conftest import TINY, compose_config, load_experiment

study = load_experiment("few_step/run")
grids = load_experiment("few_step/grids")
SHORT = ["trainer.max_steps=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0", "samples.num_samples=0"]
STUDENTS = {  # part → overrides of a tiny student (the teacher's net and size come from its checkpoint)
    "progressive": ["experiment=progressive_distill", "model.start_steps=4", "model.steps_per_round=1"],
    "cd": ["experiment=consistency_distill"],
    "ct": ["experiment=consistency_training", "data.image_size=16", "net.attention_resolutions=[8]"],
    # reflow (data=reflow_pairs, not digits): 48 pairs of 2 DPM-Solver++(2M) steps, then the 2-RF's 2 Euler steps
    "rf": ["experiment=reflow", "data.num_pairs=48", "data.val_size=16", "data.teacher_sampler=dpmpp_2m"],
    "rf_distill": ["experiment=reflow", "data.num_pairs=48", "data.val_size=16"]
    + ["model.timestep_sampler.distribution=one_step"],
}
TEACHER_OF = {"ct": None, "rf_distill": "rf"}  # whose last.ckpt each student starts from (default: the teacher's)


def test_the_students_compose_as_the_study_trains_them(tmp_path):
    for part, overrides in study.TRAIN.items():
        cfg = compose_config([*overrides, *study.STUDENT, "model.teacher_ckpt=x"], tmp_path)
        assert cfg.data.batch_size == 64 and cfg.callbacks.ema.decay == 0.995, part
    assert compose_config(study.TRAIN["progressive"], tmp_path).model.rounds == 4


def test_the_study_runs_on_tiny_models(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    teacher_cfg = [*TINY, "data.image_size=16", "net.attention_resolutions=[8]", "schedule=cosine", *SHORT]
    teacher = train(compose_config(teacher_cfg, tmp_path / "train" / "teacher"))["checkpoint"]
    (logs / "teacher" / "checkpoints").mkdir(parents=True)
    shutil.copy(teacher, logs / "teacher" / "checkpoints" / "last.ckpt")
    (logs / "teacher" / "run_summary.json").write_text('{"train_images": 32, "wall_time_s": 1.0}')
    for part, overrides in STUDENTS.items():
        kept = ("data.batch", "trainer", "callbacks", "samples", *(() if part.startswith("rf") else ("data=",)))
        student = [o for o in TINY if o.startswith(kept)]
        source = TEACHER_OF.get(part, "teacher")
        taught = [f"model.teacher_ckpt={logs / source / 'checkpoints' / 'last.ckpt'}"] if source else []
        extra = ["net=unet_s", "net.model_channels=16", "net.channel_mult=[1,2]"] if part == "ct" else []
        if part.startswith("rf"):  # the pairs in the run's folder, where the study reads their cost
            (logs / part).mkdir(parents=True, exist_ok=True)
            extra = ["data.teacher_steps=2", f"data.cache_path={logs / part / study.PAIRS_FILE}"]
        ckpt = train(compose_config([*student, *SHORT, *overrides, *extra, *taught], tmp_path / "train" / part))
        shutil.copytree(ckpt["checkpoint"].rsplit("/", 1)[0], logs / part / "checkpoints")
        (logs / part / "run_summary.json").write_text('{"train_images": 32, "wall_time_s": 2.0}')
    monkeypatch.setattr(study, "LOGS", logs)
    monkeypatch.setattr(study, "OUT", tmp_path)
    monkeypatch.setattr(study, "SOLVERS", {k: v for k, v in study.SOLVERS.items() if v[0] in ("ddim", "dpmpp_2m")})
    sizes = ["--num-samples", "4", "--num-real", "16", "--batch-size", "4", "--seeds", "0", "1", "--nfe", "1", "2"]
    study.main(["--tag", "tiny", "--teacher-dir", str(logs / "teacher"), *sizes, "--part", *study.PARTS])
    result = json.loads((tmp_path / "results_tiny.json").read_text())
    cells = {(r["method"], r["nfe"], r["seed"]) for part in study.PARTS for r in result.get(part, [])}
    for method in ("DDIM (η = 0)", "progressive distillation", "consistency distillation", "consistency training"):
        assert {(method, nfe, seed) for nfe in (1, 2) for seed in (0, 1)} <= cells, method
    assert {(study.RF, nfe, seed) for nfe in (1, 2) for seed in (0, 1)} <= cells
    assert {(m, n) for m, n, _ in cells if m == study.RF_DISTILL} == {(study.RF_DISTILL, 1)}  # one step only
    assert ("DPM-Solver++(2M)", 2, 0) in cells and ("DPM-Solver++(2M)", 1, 0) not in cells  # 2M needs 2 steps
    rows = [r for part in study.PARTS for r in result.get(part, [])]
    assert all(r["fid_fmnist_cls_v2"] > 0 and r["fid_fmnist_cls"] > 0 for r in rows)
    assert set(result["costs"]) == {"teacher", *STUDENTS} and result["costs"]["cd"]["train_images"] == 32
    assert result["costs"]["rf"]["pair_evaluations"] == result["costs"]["rf_distill"]["pair_evaluations"] == 48 * 2
    assert "pair_evaluations" not in result["costs"]["cd"]
    table = study.cost_table(result["costs"])
    assert "| 2-RF + one-step distillation | 32 | 96 (" in table and "| 64 / 96 |" in table  # + teacher and 2-RF
    assert (tmp_path / "fid_vs_nfe_tiny.png").is_file()
    grids.main(["--logs", str(logs), "--num", "2", "--out", str(tmp_path / "samples.png")])  # a row per method
    assert (tmp_path / "samples.png").is_file()

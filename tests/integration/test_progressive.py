"""`python src/train.py experiment=progressive_distill model.teacher_ckpt=...`: the round checkpoints, their
`distillation` record and own sampler (sample.py at the round's steps by default), exact resume mid-round and at a
round's end, and the errors (no teacher, a flow teacher, steps that do not halve)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf.errors import MissingMandatoryValue

from difflab.modules import load_module
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from difflab.utils.hashing import state_dict_sha256
from tests.conftest import TINY, compose_config, raises_in_config

# its module-scoped runs are made once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_progressive")

# TINY's sizes without its schedule and warm-up keys (the student takes the teacher's schedule); 2 batches an epoch
BASE = [o for o in TINY if not o.startswith(("schedule.", "model.lr_scheduler"))]
ROUNDS = ["model.start_steps=8", "model.rounds=2", "model.steps_per_round=3", "trainer.limit_train_batches=2"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A tiny ε-prediction cosine-schedule DDPM (T = 20) trained 3 steps."""
    out = tmp_path_factory.mktemp("teacher")
    run = ["schedule=cosine", "schedule.num_timesteps=20", "trainer.max_steps=3", "trainer.limit_train_batches=3"]
    return train(compose_config([*TINY, *run], out))["checkpoint"]


def distill(out: Path, teacher: str, *overrides: str) -> dict:
    cfg = compose_config(
        [*BASE, "experiment=progressive_distill", f"model.teacher_ckpt={teacher}", *ROUNDS, *overrides], out
    )
    return train(cfg)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, teacher) -> Path:
    """Two rounds of 3 steps (8 → 4 → 2 steps) in one go; its run dir."""
    out = tmp_path_factory.mktemp("uninterrupted")
    distill(out, teacher, "samples.num_samples=2")
    return out


def test_each_round_writes_its_checkpoint_with_its_steps_and_teacher(uninterrupted, teacher):
    folder = uninterrupted / "checkpoints"
    rounds = {path.name: torch.load(path, weights_only=True) for path in sorted(folder.glob("round_*.ckpt"))}
    assert sorted(rounds) == ["round_0_4steps.ckpt", "round_1_2steps.ckpt"]
    teacher_module, _ = load_module(teacher)
    for (name, checkpoint), (k, steps) in zip(sorted(rounds.items()), [(0, 4), (1, 2)], strict=True):
        record = checkpoint["distillation"]
        assert checkpoint["global_step"] == 3 * (k + 1), name
        assert record["method"] == "progressive_distillation" and record["steps"] == steps and record["round"] == k
        assert record["teacher"]["ckpt"] == str(Path(teacher).resolve())
        assert record["teacher"]["sha256"] == state_dict_sha256(teacher_module.net)
        sampler = checkpoint["difflab"]["config"]["model"]["sampler"]
        assert sampler["_target_"].endswith("DDIMSampler") and sampler["steps"] == steps
        assert sampler["eta"] == 0.0 and sampler["spacing"] == "trailing"
        assert checkpoint["difflab"]["config"]["schedule"]["beta_schedule"] == "cosine"  # the teacher's
    # round 1's teacher is round 0's sampling (EMA) weights, stored with the run's state
    round0_net = {k.removeprefix("net."): v for k, v in rounds["round_0_4steps.ckpt"]["state_dict"].items()}
    teacher_state = rounds["round_1_2steps.ckpt"]["progressive_distillation"]["teacher_state_dict"]
    assert all(torch.equal(teacher_state[k], v) for k, v in round0_net.items())
    assert rounds["round_1_2steps.ckpt"]["distillation"]["round_teacher_sha256"] != record["teacher"]["sha256"]
    summary = json.loads((uninterrupted / "run_summary.json").read_text())
    assert "2 NFE" in str(summary) or (uninterrupted / "samples" / "samples.png").exists()


@pytest.mark.parametrize("name, steps", [("round_0_4steps.ckpt", 4), ("round_1_2steps.ckpt", 2)])
def test_sample_py_samples_a_round_checkpoint_at_its_own_steps(uninterrupted, tmp_path, name, steps):
    ckpt = uninterrupted / "checkpoints" / name
    result = sample(compose_config([f"ckpt={ckpt}", "num_samples=2"], tmp_path, "sample"))
    info = json.loads(Path(result["json"]).read_text())
    assert info["sampler"]["_target_"].endswith("DDIMSampler") and info["sampler"]["steps"] == steps, info
    chosen = sample(compose_config([f"ckpt={ckpt}", "num_samples=2", "sampler.steps=3"], tmp_path / "three", "sample"))
    assert json.loads(Path(chosen["json"]).read_text())["sampler"]["steps"] == 3  # the command line still wins


def round_weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The EMA, the raw and the current round teacher's weights of a progressive distillation checkpoint."""
    checkpoint = torch.load(path, weights_only=True)
    return {key: checkpoint[key] for key in ("state_dict", "current_model_state")} | {
        "teacher": checkpoint["progressive_distillation"]["teacher_state_dict"]
    }


@pytest.mark.parametrize("stop", [2, 3, 4], ids=["mid_round_0", "end_of_round_0", "mid_round_1"])
def test_resume_equals_the_uninterrupted_run_bit_for_bit(uninterrupted, teacher, tmp_path, stop):
    distill(tmp_path / "first", teacher, f"trainer.max_steps={stop}", "samples.num_samples=0")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stop
    distill(tmp_path / "resumed", teacher, f"ckpt_path={last}", "trainer.max_steps=-1", "samples.num_samples=0")
    for name in ("round_1_2steps.ckpt", "last.ckpt"):
        ours, theirs = (
            round_weights(tmp_path / "resumed" / "checkpoints" / name),
            round_weights(uninterrupted / "checkpoints" / name),
        )
        for key in ours:
            assert all(torch.equal(ours[key][k], theirs[key][k]) for k in theirs[key]), (name, key)


@pytest.mark.parametrize("given", [[], ["model.teacher_ckpt=null"]], ids=["unset", "null"])
def test_no_teacher_is_an_error(tmp_path, given):
    with pytest.raises((MissingMandatoryValue, ValueError), match="teacher_ckpt"):
        train(compose_config([*BASE, "experiment=progressive_distill", *ROUNDS, *given], tmp_path))


def test_a_flow_teacher_is_refused(tmp_path):
    run = ["model=rectified_flow", "trainer.max_steps=1", "trainer.limit_train_batches=1", "samples.num_samples=0"]
    flow = train(compose_config([*TINY, *run], tmp_path / "flow"))["checkpoint"]
    with raises_in_config(ValueError, match="schedule: a flow process .* distils a Gaussian diffusion model"):
        distill(tmp_path / "student", flow)


def test_steps_that_do_not_halve_are_refused(teacher, tmp_path):
    with raises_in_config(ValueError, match="model.start_steps=12 does not halve model.rounds=3 times"):
        distill(tmp_path, teacher, "model.start_steps=12", "model.rounds=3")


def test_a_cfg_teacher_is_distilled_with_its_guidance_and_the_data_labels(tmp_path):
    run = ["model=cfg", "schedule.num_timesteps=20", "trainer.max_steps=1", "trainer.limit_train_batches=1"]
    cfg_teacher = train(compose_config([*TINY, *run, "samples.num_samples=0"], tmp_path / "cfg"))["checkpoint"]
    distill(tmp_path / "student", cfg_teacher, "model.rounds=1", "model.steps_per_round=2", "samples.num_samples=10")
    path = tmp_path / "student" / "checkpoints" / "round_0_4steps.ckpt"
    student, _ = load_module(path)
    assert student.num_classes == 10 and student.guidance_scale == 0.0  # the student samples unguided
    assert torch.load(path, weights_only=True)["distillation"]["teacher_guidance_scale"] == 1.0  # model=cfg's w

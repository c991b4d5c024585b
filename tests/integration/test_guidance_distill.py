"""Guidance distillation (Meng et al. 2023; issue 31's bonus), `experiment=guidance_distill`, end to end: the
acceptance test on a tiny class-conditional teacher (the loss falls in stage one and in the round; the 1-step student
at w is closer to the guided teacher's many-step samples at w than the teacher's own guided 1-step samples, at two w,
and closer to them than to the other w's: the w input matters), the checkpoints and their record, train → sample.py
at a chosen w with one network evaluation per step, exact resume in stage one and across it, going on halving a
guidance-distilled checkpoint, and the error paths."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from difflab.modules import load_module
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from tests.conftest import DIGITS_8, TINY, compose_config, raises_in_config
from tests.integration.test_progressive import round_weights

pytestmark = pytest.mark.xdist_group("test_guidance_distill")  # module-scoped runs: one worker

W = (0.5, 3.0)  # the comparisons' guidance scales, either side of the trained [0, 4]'s middle
ACCEPTANCE = [
    "experiment=guidance_distill",
    "model.start_steps=2",
    "model.rounds=1",
    "model.guidance_steps=100",
    "model.steps_per_round=60",
    "model.optimizer.lr=3e-3",
    "callbacks.ema.decay=0.9",
    "trainer.log_every_n_steps=1",
]
DDIM = {"_target_": "difflab.samplers.DDIMSampler", "_partial_": True, "eta": 0.0, "spacing": "trailing"}

# the mechanics on the session's tiny CFG model (T = 20): N_0 = 8, stage one 3 steps, rounds 8 → 4 → 2 of 3 steps
BASE = [o for o in TINY if not o.startswith(("schedule.", "model.lr_scheduler"))]
TINY_RUN = [
    "experiment=guidance_distill",
    "model.start_steps=8",
    "model.rounds=2",
    "model.guidance_steps=3",
    "model.steps_per_round=3",
    "trainer.limit_train_batches=2",
]
CHECKPOINTS = {"guided_8steps.ckpt": (-1, 8, 3), "round_0_4steps.ckpt": (0, 4, 6), "round_1_2steps.ckpt": (1, 2, 9)}


@pytest.fixture(scope="module")
def cfg_teacher(tmp_path_factory) -> str:
    """A class-conditional v-prediction CFG model (p_uncond 0.1, w = 1) on 8x8 digits, cosine T = 1000, 150 steps
    (~6 s on one core): v like the student, so stage one starts as its conditional network exactly."""
    run = ["model=cfg", "model.parameterization=v", "schedule=cosine", "trainer.max_steps=150"]
    run += ["model.lr_scheduler.warmup_steps=1", "model.optimizer.lr=2e-3", "callbacks.ema.decay=0.99"]
    return train(compose_config([*DIGITS_8, *run], tmp_path_factory.mktemp("cfg_teacher")))["checkpoint"]


def distill(out: Path, teacher: str, *overrides: str, run: list[str] = TINY_RUN) -> dict:
    return train(compose_config([*BASE, *run, f"model.teacher_ckpt={teacher}", *overrides], out))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_cfg_checkpoint) -> Path:
    """Stage one then two rounds in one go (9 steps); its run dir."""
    out = tmp_path_factory.mktemp("guided_uninterrupted")
    distill(out, tiny_cfg_checkpoint, "samples.num_samples=2")
    return out


def draw(path: str | Path, w: float, steps: int | None = None, n: int = 64) -> torch.Tensor:
    """n guided samples at w from the same initial noise (seed 1): the checkpoint's own sampler, or DDIM ``steps``."""
    module, _ = load_module(path, sampler=None if steps is None else {**DDIM, "steps": steps})
    return module.sample(n, generator=torch.Generator().manual_seed(1), guidance_scale=w)


def test_the_one_step_student_follows_the_guided_teacher_at_each_w(cfg_teacher, tmp_path):
    train(compose_config([*DIGITS_8, *ACCEPTANCE, f"model.teacher_ckpt={cfg_teacher}"], tmp_path))
    rows = csv.DictReader(next(tmp_path.rglob("metrics.csv")).open())
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 160
    for name, part in (("stage one", losses[:100]), ("round 0", losses[100:])):  # (a) the loss falls
        k = len(part) // 5
        first, last = sum(part[:k]) / k, sum(part[-k:]) / k
        assert last < 0.6 * first, (name, first, last)
    mse = lambda a, b: ((a - b) ** 2).mean().item()  # noqa: E731
    reference = {w: draw(cfg_teacher, w, 50) for w in W}
    student = {w: draw(tmp_path / "checkpoints" / "round_0_1steps.ckpt", w) for w in W}
    for w, other in (W, W[::-1]):
        ours, its = mse(student[w], reference[w]), mse(draw(cfg_teacher, w, 1), reference[w])
        crossed = mse(student[w], reference[other])
        print(
            f"w={w}: 1 step, MSE to the teacher's guided 50-step DDIM {ours:.4f} (to w={other}'s {crossed:.4f}); "
            f"the teacher's own guided 1 step {its:.4f}"
        )
        assert ours < 0.5 * its  # (b) with a clear margin
        assert ours < 0.8 * crossed  # the w input steers it towards the teacher at that w


def test_each_stage_writes_its_checkpoint_with_its_steps_and_w_range(uninterrupted, tiny_cfg_checkpoint):
    folder = uninterrupted / "checkpoints"
    files = {name: torch.load(folder / name, weights_only=True) for name in CHECKPOINTS}
    assert sorted(p.name for p in folder.glob("*steps.ckpt")) == sorted(CHECKPOINTS)
    for name, (k, steps, step) in CHECKPOINTS.items():
        checkpoint = files[name]
        record = checkpoint["distillation"]
        assert checkpoint["global_step"] == step and record["round"] == k and record["steps"] == steps, name
        assert record["w_range"] == [0.0, 4.0] and record["guidance_steps"] == 3
        assert record["guidance_scale"] == 1.0 and record["teacher_guidance_scale"] is None  # model=cfg's w: default
        assert record["teacher_steps"] == (8 if k < 0 else 2 * steps)
        assert record["teacher"]["ckpt"] == str(Path(tiny_cfg_checkpoint).resolve())
        model = checkpoint["difflab"]["config"]["model"]
        assert model["sampler"]["steps"] == steps and model["guidance_scale"] == 1.0 and model["w_max"] == 4.0
        assert "net.guidance_embed.proj.weight" in checkpoint["state_dict"]
    # round 0's teacher is stage one's sampling (EMA) weights, w input included, stored with the run's state
    stage_one = {k.removeprefix("net."): v for k, v in files["guided_8steps.ckpt"]["state_dict"].items()}
    teacher_state = files["round_1_2steps.ckpt"]["progressive_distillation"]["teacher_state_dict"]
    round0 = {k.removeprefix("net."): v for k, v in files["round_0_4steps.ckpt"]["state_dict"].items()}
    assert all(torch.equal(teacher_state[k], v) for k, v in round0.items())
    mid_round0 = torch.load(folder / "round_0_4steps.ckpt", weights_only=True)["progressive_distillation"]
    assert mid_round0["round"] == 0 and all(
        torch.equal(mid_round0["teacher_state_dict"][k], v) for k, v in stage_one.items()
    )


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_sample_py_draws_guided_samples_at_a_chosen_w_with_one_evaluation_per_step(uninterrupted, tmp_path, name):
    steps = CHECKPOINTS[name][1]
    ckpt = uninterrupted / "checkpoints" / name
    overrides = [f"ckpt={ckpt}", "num_samples=2", "device=cpu", "progress=false", "guidance_scale=2"]
    done = sample(compose_config(overrides, tmp_path, "sample"))
    summary = done["summary"]
    assert summary["sampler"] == "DDIMSampler" and summary["steps"] == steps and summary["nfe"] == steps
    assert json.loads(Path(done["json"]).read_text())["guidance_scale"] == 2.0
    module, _ = load_module(ckpt)
    calls = []
    module.net.register_forward_hook(lambda net, a, kw, out: calls.append((a[0].shape[0], kw["w"])), with_kwargs=True)
    module.sample(3, generator=torch.Generator().manual_seed(0), guidance_scale=2.5)
    assert len(calls) == steps and all(b == 3 and torch.equal(w, torch.full((3,), 2.5)) for b, w in calls)
    with pytest.raises(ValueError, match=r"guidance_scale=4.5: .* \[model.w_min, model.w_max\] = \[0.0, 4.0\]"):
        sample(compose_config([*overrides[:-1], "guidance_scale=4.5"], tmp_path / "outside", "sample"))


@pytest.mark.parametrize("stop", [2, 3, 4], ids=["mid_stage_one", "end_of_stage_one", "mid_round_0"])
def test_resume_equals_the_uninterrupted_run_bit_for_bit(uninterrupted, tiny_cfg_checkpoint, tmp_path, stop):
    distill(tmp_path / "first", tiny_cfg_checkpoint, f"trainer.max_steps={stop}", "samples.num_samples=0")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    resumed = [f"ckpt_path={last}", "trainer.max_steps=-1", "samples.num_samples=0"]
    distill(tmp_path / "resumed", tiny_cfg_checkpoint, *resumed)
    for name in ("round_0_4steps.ckpt", "round_1_2steps.ckpt", "last.ckpt"):
        ours = round_weights(tmp_path / "resumed" / "checkpoints" / name)
        theirs = round_weights(uninterrupted / "checkpoints" / name)
        for key in ours:
            assert all(torch.equal(ours[key][k], theirs[key][k]) for k in theirs[key]), (name, key)


def test_a_guidance_distilled_checkpoint_goes_on_halving_with_its_w_range(uninterrupted, tmp_path):
    teacher = uninterrupted / "checkpoints" / "round_1_2steps.ckpt"
    run = ["experiment=progressive_distill", "model.start_steps=2", "model.rounds=1", "model.steps_per_round=2"]
    result = distill(tmp_path, str(teacher), "trainer.limit_train_batches=2", "samples.num_samples=0", run=run)
    record = torch.load(result["checkpoint"], weights_only=True)["distillation"]
    assert record["w_range"] == [0.0, 4.0] and record["steps"] == 1 and record["guidance_steps"] == 0  # taken over
    with raises_in_config(ValueError, "model.guidance_steps=3: the teacher already takes w as an input"):
        distill(tmp_path / "again", str(teacher))
    with raises_in_config(ValueError, r"model.w_min=0.0, model.w_max=6.0: outside the teacher's trained range"):
        distill(tmp_path / "wider", str(teacher), "model.guidance_steps=0", "model.w_max=6.0")


def test_error_paths(tiny_checkpoint, tiny_cfg_checkpoint, tmp_path):
    with raises_in_config(ValueError, "model.w_min=0.0, model.w_max=4.0: the teacher is unconditional"):
        distill(tmp_path / "unconditional", tiny_checkpoint)
    with raises_in_config(ValueError, "model.guidance_scale=5.0: the default w must lie in the trained range"):
        distill(tmp_path / "default_w", tiny_cfg_checkpoint, "model.guidance_scale=5.0")
    with raises_in_config(ValueError, "model.teacher_guidance_scale=2.0: with model.w_min/model.w_max"):
        distill(tmp_path / "fixed_w", tiny_cfg_checkpoint, "model.teacher_guidance_scale=2.0")
    fixed = ["experiment=progressive_distill", "model.start_steps=8", "model.rounds=1", "model.steps_per_round=1"]
    pd = distill(
        tmp_path / "pd", tiny_cfg_checkpoint, "trainer.limit_train_batches=1", "samples.num_samples=0", run=fixed
    )
    with raises_in_config(ValueError, "model.guidance_steps=3: stage one .* needs the w range"):
        distill(tmp_path / "from_pd", pd["checkpoint"])  # distilled at one fixed w: its range is null

"""Reflow from a diffusion teacher (InstaFlow, Liu et al. 2023): the pairs are the chosen deterministic solver's ODE
solutions from the same noise (DDPM, iDDPM, CFG teachers), the cache is keyed by the solver, stochastic samplers and
bad names are refused at construction, the flow student starts as the teacher's network (a learned-variance teacher
is refused with the way out), and end to end: a tiny cosine DDPM → its 2-rectified flow → one-step distillation,
both sampled with sample.py and load_module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from difflab.data import PairsDataModule
from difflab.data.pairs import noise_seed
from difflab.data.teacher_sampler import sampler_preset
from difflab.modules import load_module, read_run_record
from difflab.tasks.resume import teacher_config
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from difflab.utils.checkpoint_io import CheckpointError
from tests.conftest import TINY, compose_config, perturb_weights, raises_in_config

pytestmark = pytest.mark.xdist_group("test_reflow_diffusion")  # the module-scoped teacher is trained once

# 8x8 digits, the tiny UNet, the cosine schedule at T = 1000 (the study's teacher, small)
BASE = [o for o in TINY if not o.startswith("schedule.")] + [
    "data.image_size=8",
    "schedule=cosine",
    "trainer.limit_val_batches=0",
    "callbacks.sample_grid=null",
    "samples.num_samples=0",
]
# experiment=reflow on it: the net and image size come from the teacher (train.py); the student's T stays 1000 (the
# net's time input t = T·τ, as the teacher's)
REFLOW = [o for o in BASE if not o.startswith(("data=", "schedule=", "net", "data.image_size"))] + [
    "experiment=reflow",
    "data.num_pairs=48",
    "data.val_size=16",
    "trainer.log_every_n_steps=1",
]


def write_teacher(out: Path, *overrides: str) -> str:
    """An untrained diffusion checkpoint (weights perturbed off the zero output layer) with its run record."""
    cfg = compose_config([*BASE, *overrides], out)
    module = instantiate(cfg.model)
    perturb_weights(module)
    path = out / "teacher.ckpt"
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": OmegaConf.to_container(cfg, resolve=True)}
    torch.save({"state_dict": module.state_dict(), "difflab": record}, path)
    return str(path)


def pairs_module(teacher: str, tmp_path: Path, sampler: str | None = "ddim", **kwargs) -> PairsDataModule:
    settings = {"num_pairs": 24, "teacher_steps": 4, "image_size": 8, "batch_size": 8, "val_size": 8}
    settings.update(generate_batch_size=24, teacher_sampler=sampler, cache_path=str(tmp_path / f"{sampler}.pt"))
    return PairsDataModule(teacher, **{**settings, **kwargs})


@pytest.mark.parametrize("model", ["ddpm", "iddpm", "cfg"])
def test_pairs_are_the_chosen_solvers_ode_solutions_from_the_same_noise(tmp_path, model):
    """x̂_0,k = the teacher's sample with the chosen sampler from x_T = ε_k (the noise sample() draws from the pairs'
    noise seed):
    for an ε-teacher, a learned-variance one (the solver reads its mean channels) and a guided class-conditional
    one (labels in turn, its default w)."""
    teacher = write_teacher(tmp_path, f"model={model}")
    made = {}
    for name in ("ddim", "dpmpp_2m"):
        pairs = pairs_module(teacher, tmp_path, name).load_pairs()
        module, _ = load_module(teacher, sampler=sampler_preset(name))
        labels = torch.arange(24) % 10 if model == "cfg" else None
        stream = noise_seed(0)  # the pairs' own noise stream, not sample.py's seed 0
        expected = module.sample(24, torch.Generator().manual_seed(stream), num_steps=4, y=labels)
        assert torch.equal(pairs["noise"], torch.randn(24, 1, 8, 8, generator=torch.Generator().manual_seed(stream)))
        assert torch.equal(pairs["x_start"].clamp(-1, 1), expected)  # one batch of 24 in both: the same arithmetic
        guided = 2 if model == "cfg" else 1  # CFG: the conditional and the unconditional ε per step
        assert pairs["generation"]["network_evaluations"] == 24 * 4 * guided
        made[name] = pairs["x_start"]
    assert (made["ddim"] - made["dpmpp_2m"]).abs().max() > 1e-3  # two solvers, two sets of pairs


def test_the_cache_is_keyed_by_the_solver(tmp_path):
    teacher = write_teacher(tmp_path, "model=ddpm")
    default = {"cache_path": None}
    ddim, dpm = (
        pairs_module(teacher, tmp_path, "ddim", **default),
        pairs_module(teacher, tmp_path, "dpmpp_2m", **default),
    )
    leading = pairs_module(teacher, tmp_path, "ddim", teacher_sampler_options={"spacing": "leading"}, **default)
    names = {m.cache_path.name for m in (ddim, dpm, leading)}
    assert len(names) == 3 and all(n.startswith("reflow_pairs_24_") and n.endswith("_4_seed0.pt") for n in names)
    assert ddim.settings["sampler"]["_target_"] == "difflab.samplers.DDIMSampler"
    assert leading.settings["sampler"]["spacing"] == "leading" and ddim.settings["sampler"]["eta"] == 0.0
    ddim.load_pairs()
    with pytest.raises(CheckpointError, match="delete the file"):  # the DDIM pairs are not DPM-Solver's
        pairs_module(teacher, tmp_path, "dpmpp_2m", cache_path=str(ddim.cache_path)).load_pairs()


def test_a_flow_teacher_with_its_own_sampler_or_a_flow_solver(tmp_path):
    """The flow path with its own sampler (no sampler in the settings or the file name), and a flow
    solver by name; a diffusion solver on a flow is refused naming the flow samplers."""
    from tests.integration.test_flow import write_flow_teacher

    flow = str(write_flow_teacher(tmp_path))
    common = {"num_pairs": 40, "teacher_steps": 2, "image_size": 32, "batch_size": 8, "val_size": 8}
    own = PairsDataModule(flow, **common)
    assert own.cache_path.name == "reflow_pairs_40_2_seed0.pt" and set(own.settings) == {
        "teacher_ckpt",
        "num_pairs",
        "steps",
        "seed",
        "noise_seed",
    }
    heun = PairsDataModule(flow, teacher_sampler="flow_heun", **common)
    assert heun.cache_path.name.startswith("reflow_pairs_40_flow_heun-") and heun.settings["sampler"]["steps"] == 10
    with pytest.raises(ValueError, match="DDIMSampler samples a gaussian process.*flow_euler"):
        PairsDataModule(flow, teacher_sampler="ddim", **common)


@pytest.mark.parametrize(
    ("sampler", "options", "match"),
    [
        (None, {}, "the teacher's own sampler.*AncestralSampler draws fresh noise"),  # the DDPM's own
        ("ddpm", {"steps": 4}, "AncestralSampler draws fresh noise.*data.teacher_sampler=ddim"),
        ("ddim", {"eta": 0.5}, "DDIMSampler draws fresh noise"),
        ("dpmpp_2m_sde", {}, "DPMSolverSDESampler draws fresh noise"),
        ("euler_ancestral", {}, "EulerAncestralSampler draws fresh noise"),
        ("edm", {}, "EDMSampler draws fresh noise"),  # its churn
        ("ddim", {"variance_type": "analytic"}, "Analytic-DPM's optimal variance as fresh noise"),
        ("../sampler/ddim", {}, "data.teacher_sampler='../sampler/ddim': expected the name of a conf/sampler file"),
        ("ddim", {"temperature": 1.0}, "teacher_sampler_options.temperature: DDIMSampler has no such setting"),
        ("ddim", {"_target_": "os.system"}, r"teacher_sampler_options._target_: not a sampler setting"),
        ("ddim", {"spacing": {"_target_": "os.system"}}, "refused.*os.system"),
        ("flow_euler", {}, "FlowEulerSampler samples a flow process"),
        ("ddim", {"steps": 2000}, "sampler.steps=2000"),
    ],
)
def test_a_stochastic_sampler_or_a_bad_choice_is_refused_at_construction(tmp_path, sampler, options, match):
    teacher = write_teacher(tmp_path, "model=ddpm")
    options = dict(options)
    steps = options.pop("steps", 4)
    with pytest.raises(ValueError, match=match):
        pairs_module(teacher, tmp_path, sampler, teacher_steps=steps, teacher_sampler_options=options)
    assert not any(tmp_path.glob("*.pt"))  # refused before anything was generated


def test_the_flow_student_starts_as_the_diffusion_teachers_network(tmp_path):
    """train.py's teacher_config gives the student the teacher's net and image size; the warm start copies its
    (EMA) weights exactly. A learned-variance teacher (2C output channels) is refused with the way out, which
    works: a fresh student on its couplings."""
    teacher = write_teacher(tmp_path / "ddpm", "model=ddpm")
    common = ["data.teacher_sampler=ddim", "data.teacher_steps=4"]
    cfg = compose_config([*REFLOW, f"model.teacher_ckpt={teacher}", *common], tmp_path / "a")
    cfg = teacher_config(cfg, read_run_record(teacher), "model.teacher_ckpt")
    assert cfg.net.model_channels == 16 and cfg.data.image_size == 8
    student = instantiate(cfg.model)
    taught = torch.load(teacher, weights_only=True)["state_dict"]
    assert all(torch.equal(v, taught[f"net.{k}"]) for k, v in student.net.state_dict().items())
    assert student.diffusion.process_kind == "flow" and student.parameterization.value == "v"

    iddpm = write_teacher(tmp_path / "iddpm", "model=iddpm")
    cfg = compose_config([*REFLOW, f"model.teacher_ckpt={iddpm}", *common], tmp_path / "b")
    cfg = teacher_config(cfg, read_run_record(iddpm), "model.teacher_ckpt")
    with raises_in_config(CheckpointError, match="learns its variance.*model.teacher_ckpt=null data.teacher_ckpt="):
        instantiate(cfg.model)
    fresh = [*REFLOW, "model.teacher_ckpt=null", f"data.teacher_ckpt={iddpm}", *common, "data.image_size=8"]
    fresh += ["net=unet_s", "net.model_channels=16", "net.channel_mult=[1,2]", "trainer.max_steps=1"]
    result = train(compose_config(fresh, tmp_path / "fresh"))
    assert np.isfinite(result["metrics"]["train/loss"])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A cosine-schedule ε-prediction DDPM on 8x8 digits, 40 steps (a few seconds on one core)."""
    run = ["trainer.max_steps=40", "model.lr_scheduler.warmup_steps=1", "model.optimizer.lr=2e-3"]
    return train(compose_config([*BASE, *run], tmp_path_factory.mktemp("teacher")))["checkpoint"]


def test_a_ddpm_reflowed_then_distilled_to_one_step_and_sampled(teacher, tmp_path):
    """experiment=reflow from the DDPM with DPM-Solver++(2M) pairs → the 2-rectified flow; experiment=reflow from
    that with model.timestep_sampler.distribution=one_step → its one-step distillation; both sample with sample.py
    (the flow's own Euler sampler) and load_module."""

    def fit(name: str, teacher_ckpt: str, *extra: str) -> dict:
        overrides = [*REFLOW, f"model.teacher_ckpt={teacher_ckpt}", f"data.cache_path={tmp_path}/{name}.pt"]
        return train(compose_config([*overrides, "trainer.max_steps=3", *extra], tmp_path / name))

    rf = fit("rf", teacher, "data.teacher_sampler=dpmpp_2m", "data.teacher_steps=4")
    cached = torch.load(tmp_path / "rf.pt", weights_only=True)
    assert cached["settings"]["sampler"]["_target_"].endswith("DPMSolverMultistepSampler")
    assert cached["generation"]["network_evaluations"] == 48 * 4 and cached["generation"]["seconds"] > 0
    distilled = fit(
        "one_step", rf["checkpoint"], "model.timestep_sampler.distribution=one_step", "data.teacher_steps=2"
    )
    assert "sampler" not in torch.load(tmp_path / "one_step.pt", weights_only=True)["settings"]  # the flow's own
    for result in (rf, distilled):
        assert np.isfinite(result["metrics"]["train/loss"])
    for name, result, steps in (("rf", rf, 2), ("one_step", distilled, 1)):
        cfg = compose_config(
            [f"ckpt={result['checkpoint']}", "num_samples=4", f"sampler.steps={steps}"],
            tmp_path / f"s_{name}",
            "sample",
        )
        drawn = sample(cfg)
        assert np.load(drawn["npz"])["arr_0"].shape == (4, 8, 8, 1)
        info = json.loads(Path(drawn["json"]).read_text())
        assert info["sampler_name"] == "FlowEulerSampler" and info["sampler"]["steps"] == steps
        module, _ = load_module(result["checkpoint"])
        images = module.sample(3, torch.Generator().manual_seed(0), num_steps=steps)
        assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()

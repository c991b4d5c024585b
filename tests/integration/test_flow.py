"""Rectified flow end to end on CPU: fast_dev_run with the UNet and the DiT (class-conditional with CFG too) and in
latent space, sample.py
and eval.py (FID, straightness) on a flow checkpoint, reflow's pairs (seeded, cached, checked) and bit-exact resume
of a reflow run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from difflab.data import PairsDataModule, generate_pairs
from difflab.modules import load_module
from difflab.tasks.eval import evaluate
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from difflab.utils.checkpoint_io import CheckpointError
from tests.conftest import TINY, TINY_DIT, compose_config, raises_in_config
from tests.unit.test_metrics import weights_dir  # noqa: F401  (fixture)

# its module-scoped checkpoints are trained once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_flow")

CONDITIONAL = ["model.num_classes=${data_num_classes:}", "model.p_uncond=0.2", "model.guidance_scale=1.5"]
QUIET = ["callbacks.sample_grid=null", "samples.num_samples=0"]
# experiment=reflow on the tiny teacher: 48 pairs (16 held out) of a 2-step Euler ODE, batches of 16
REFLOW = [
    *(o for o in TINY if not o.startswith(("data=", "callbacks.sample_grid", "samples."))),
    *QUIET,
    *CONDITIONAL,  # the teacher's classes: the pairs carry them
    "experiment=reflow",
    "data.num_pairs=48",
    "data.val_size=16",
    "data.teacher_steps=2",
    "data.image_size=16",
    "trainer.log_every_n_steps=1",
]


def write_flow_teacher(out: Path) -> Path:
    """An untrained flow checkpoint (model=rectified_flow, unet_s, the default 32x32 Fashion-MNIST) with the keys a
    teacher needs (weights and run record): what the config tests give experiment=reflow and data=reflow_pairs."""
    cfg = compose_config(["model=rectified_flow", "net=unet_s"], out)
    path = out / "teacher.ckpt"
    state = instantiate(cfg.model).state_dict()
    torch.save({"state_dict": state, "difflab": {"config": OmegaConf.to_container(cfg, resolve=True)}}, path)
    return path


@pytest.mark.parametrize("net", ["unet", "dit"])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cfg"])
def test_fast_dev_run_rectified_flow(tiny_cfg, tmp_path, net, conditional):
    base = TINY if net == "unet" else TINY_DIT
    extra = CONDITIONAL if conditional else []
    cfg = compose_config([*base, "model=rectified_flow", "debug=fast", "samples.num_samples=4", *extra], tmp_path)
    result = train(cfg)
    assert np.isfinite(result["metrics"]["train/loss"]) and result["grid"].is_file()


def test_latent_rectified_flow_fast_dev_run(tmp_path):
    """The latent diffusion module with the flow process: the shipped kl-f4 stage 1, class-conditional, decoded."""
    flow = ["schedule=rectified_flow", "sampler=flow_euler", "model.parameterization=v"]
    flow += ["model.timestep_sampler._target_=difflab.losses.FlowTimestepSampler"]
    shape = ["data.image_size=32", "net.num_heads=2", "net.num_head_channels=-1"]
    result = train(compose_config([*TINY, "model=ldm", *flow, *shape, "debug=fast", "samples.num_samples=4"], tmp_path))
    assert np.isfinite(result["metrics"]["train/loss"])
    assert np.load(result["npz"])["arr_0"].shape == (4, 32, 32, 1)


def test_a_diffusion_sampler_on_a_flow_model_fails_at_construction(tiny_cfg):
    with raises_in_config(ValueError, match="flow_euler"):
        instantiate(tiny_cfg("model=rectified_flow", "sampler=ddim").model)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A class-conditional flow trained 3 steps, its weights moved off the zero-initialised output layer."""
    out = tmp_path_factory.mktemp("teacher")
    cfg = compose_config(
        [*TINY, *QUIET, *CONDITIONAL, "model=rectified_flow", "trainer.max_steps=3", "model.optimizer.lr=0.05"], out
    )
    return train(cfg)["checkpoint"]


def test_sample_and_eval_on_a_flow_checkpoint(teacher, tmp_path, weights_dir):  # noqa: F811
    def draw(name: str, *extra: str):
        cfg = compose_config(
            [f"ckpt={teacher}", "num_samples=6", "sampler=flow_heun", "sampler.steps=3", *extra],
            tmp_path / name,
            "sample",
        )
        return np.load(sample(cfg)["npz"])["arr_0"]

    first, again, shifted = draw("a"), draw("b"), draw("c", "sampler.shift=3.0")
    assert first.shape == (6, 16, 16, 1) and np.array_equal(first, again) and not np.array_equal(first, shifted)
    # sample.py's default (a diffusion solver, not chosen here) gives way to the flow's own sampler, with the
    # sampler.KEYs given; a diffusion sampler the user names is an error naming the flow samplers
    own = sample(compose_config([f"ckpt={teacher}", "num_samples=6", "sampler.steps=3"], tmp_path / "d", "sample"))
    euler = compose_config(
        [f"ckpt={teacher}", "num_samples=6", "sampler=flow_euler", "sampler.steps=3"], tmp_path / "e", "sample"
    )
    assert np.array_equal(np.load(own["npz"])["arr_0"], np.load(sample(euler)["npz"])["arr_0"])
    info = json.loads(Path(own["json"]).read_text())  # the record names the sampler that drew them
    assert info["sampler_name"] == "FlowEulerSampler" and info["sampler"]["steps"] == 3
    with raises_in_config(ValueError, match="flow_euler"):
        sample(compose_config([f"ckpt={teacher}", "num_samples=2", "sampler=dpmpp_2m"], tmp_path / "f", "sample"))
    overrides = [f"ckpt={teacher}", "metrics=[fid,straightness]", "num_samples=8", "num_real=16", "batch_size=8"]
    report = evaluate(compose_config([*overrides, "straightness_steps=4"], tmp_path / "eval", "eval"))
    results = json.loads(json.dumps(report))["results"]  # what eval.py wrote beside the checkpoint
    with pytest.raises(ValueError, match="flow"):
        evaluate(compose_config([*overrides[:1], "metrics=[nll]", "nll_images=2"], tmp_path / "nll", "eval"))
    assert results["fid_fmnist_cls"] > 0 and results["straightness"] > 0 and results["straightness_steps"] == 4


def test_reflow_pairs_are_seeded_cached_and_checked(teacher, tmp_path):
    def pairs_module(seed: int, cache: str) -> PairsDataModule:
        return PairsDataModule(
            teacher,
            num_pairs=40,
            teacher_steps=2,
            cache_path=str(tmp_path / cache),
            seed=seed,
            image_size=16,
            batch_size=8,
            val_size=8,
        )

    first = pairs_module(0, "a.pt").load_pairs()
    module, _ = load_module(teacher)
    again = generate_pairs(module, 40, 2, 0, batch_size=16)  # another batch size: the same pairs
    for key in ("x_start", "noise", "labels"):
        torch.testing.assert_close(first[key], again[key], rtol=0, atol=1e-5)
    assert first["labels"].tolist()[:12] == [i % 10 for i in range(12)]  # the teacher's classes in turn
    sample_noise = torch.randn(first["noise"].shape, generator=torch.Generator().manual_seed(0))  # sample.py seed=0
    assert (first["noise"] - sample_noise).abs().max() > 1  # never the noises of the couplings it trains on
    other = pairs_module(1, "b.pt").load_pairs()
    assert not torch.allclose(first["noise"], other["noise"])
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)  # plain tensors: safe to open
    assert loaded["settings"]["seed"] == 0
    with pytest.raises(CheckpointError, match="delete the file"):
        pairs_module(1, "a.pt").load_pairs()  # a cache made with seed 0 is not reused for seed 1
    datamodule = pairs_module(0, "a.pt")
    datamodule.setup()
    x0, y, eps = next(iter(datamodule.train_dataloader()))
    assert x0.shape == eps.shape == (8, 1, 16, 16) and len(datamodule.val) == 8 and len(datamodule.test[0]) == 2


def test_the_nll_callback_refuses_a_flow_before_training(tmp_path):
    cfg = compose_config([*TINY, "model=rectified_flow", "callbacks=[default,nll]", "debug=fast"], tmp_path)
    with pytest.raises(ValueError, match="callbacks.nll: the bound in bits/dim is a discrete Gaussian diffusion's VLB"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_latent_teacher_is_refused_at_construction(tmp_path):
    """Reflow trains a pixel-space student on the teacher's images: a latent flow's ODE ends in latents."""
    cfg = compose_config(["model=rectified_flow", "net=unet_s"], tmp_path)
    config = OmegaConf.to_container(cfg, resolve=True)
    config["model"]["_target_"] = "difflab.modules.LatentDiffusionModule"
    torch.save({"state_dict": {}, "difflab": {"config": config}}, tmp_path / "latent.ckpt")
    with pytest.raises(ValueError, match="a latent rectified flow"):
        PairsDataModule(str(tmp_path / "latent.ckpt"), num_pairs=40, image_size=32, batch_size=8, val_size=8)


def test_reflow_resumes_bit_exact_and_starts_from_the_teacher(teacher, tmp_path):
    def fit(name: str, *extra: str):
        cfg = compose_config(
            [*REFLOW, f"model.teacher_ckpt={teacher}", f"data.cache_path={tmp_path}/p.pt", *extra], tmp_path / name
        )
        return train(cfg)

    full = fit("full", "trainer.max_steps=4")
    first = fit("first", "trainer.max_steps=2")
    resumed = fit("resumed", "trainer.max_steps=4", f"ckpt_path={first['checkpoint']}")
    a, b = (torch.load(r["checkpoint"], weights_only=True) for r in (full, resumed))
    assert a["global_step"] == b["global_step"] == 4
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    start = torch.load(teacher, weights_only=True)["state_dict"]
    student = torch.load(first["checkpoint"], weights_only=True)["current_model_state"]
    moved = max((student[k] - start[k]).abs().max().item() for k in start if k.startswith("net."))
    assert moved < 1e-2  # 2 Adam steps of lr 2e-4 from the teacher's weights (a fresh init differs by O(0.1))
    module, _ = load_module(resumed["checkpoint"])  # sampling needs no teacher file
    assert module.sample(2, torch.Generator().manual_seed(0)).shape == (2, 1, 16, 16)


def test_reflow_takes_the_teachers_net_and_image_shape(teacher, tmp_path, caplog):
    """`experiment=reflow model.teacher_ckpt=...` alone: the student is the teacher's network (its 16-channel tiny
    UNet, not the default unet_m) on 16x16 digits (not 32x32), so the warm start and the pairs fit; a key given on
    the command line still wins."""
    import logging

    common = [f"model.teacher_ckpt={teacher}", "trainer=cpu", "trainer.max_steps=1", *QUIET, *CONDITIONAL]
    common += ["data.num_pairs=48", "data.val_size=16", "data.batch_size=16", "data.teacher_steps=2"]
    common += [f"data.cache_path={tmp_path}/p.pt"]
    with caplog.at_level(logging.INFO):
        result = train(compose_config(["experiment=reflow", *common], tmp_path / "a"))
    assert "the student takes the teacher's net (UNet), data.image_size=16, data.channels=1" in caplog.text
    record = torch.load(result["checkpoint"], weights_only=True)["difflab"]["config"]
    assert record["net"]["model_channels"] == 16 and record["data"]["image_size"] == 16
    with raises_in_config(ValueError, match="data.image_size=32: the teacher"):
        train(compose_config(["experiment=reflow", *common, "data.image_size=32"], tmp_path / "b"))

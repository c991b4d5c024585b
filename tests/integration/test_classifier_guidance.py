"""Classifier guidance end to end: the noisy classifier trains and its checkpoint loads safely; sample.py and eval.py
guide with it (classifier_ckpt=, classifier_scale=); mismatches between classifier and diffusion model fail clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from difflab.modules import LatentDiffusionModule, NoisyClassifierModule, load_module
from difflab.tasks.classifier_guidance import check_compatible
from difflab.tasks.eval import evaluate
from difflab.tasks.train import train
from tests.conftest import TINY, compose_config, raises_in_config
from tests.integration.test_sample_modes import run
from tests.unit.test_metrics import weights_dir  # noqa: F401  (fixture)

# its module-scoped checkpoints are trained once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_classifier_guidance")

# The noisy classifier at test size: digits 16x16 and T = 20 as TINY's diffusion model, a width-8 net, 3 steps.
TINY_CLASSIFIER = [
    "experiment=noisy_classifier_fmnist",
    "data=digits",
    "data.batch_size=16",
    "schedule.num_timesteps=20",
    "model.net.width=8",
    "model.net.num_features=16",
    "model.net.time_embed_dim=16",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "test=false",
]


@pytest.fixture
def checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy_classifier")
    return train(compose_config(TINY_CLASSIFIER, out))


def test_noisy_classifier_trains_and_its_checkpoint_loads_weights_only(classifier_run):
    metrics = classifier_run["metrics"]
    assert {"train/loss", "val/acc", "val/acc_clean"} <= set(metrics)
    assert np.isfinite(metrics["train/loss"])
    torch.load(classifier_run["checkpoint"], weights_only=True)  # tensors and plain containers only
    module, record = load_module(classifier_run["checkpoint"])
    assert isinstance(module, NoisyClassifierModule) and module.diffusion.num_timesteps == 20
    assert record["config"]["model"]["_target_"].endswith("NoisyClassifierModule")
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0.0, 7.5, 19.0])  # fractional t as the solvers pass it
    assert module(x, t).shape == (3, 10)


def test_training_sees_noised_images_at_uniform_timesteps(tmp_path):
    """The training batch reaches the net as q_sample(x_0, t, ε) with t spread over [0, T), each t its own x_t."""
    module = instantiate(compose_config(TINY_CLASSIFIER, tmp_path).model)
    seen = {}
    forward = module.net.forward
    module.net.forward = lambda x, t: seen.update(x=x, t=t) or forward(x, t)
    module.log = lambda *args, **kwargs: None
    x0 = torch.rand(256, 1, 16, 16) * 2 - 1
    torch.manual_seed(0)
    module.training_step((x0, torch.randint(0, 10, (256,))), 0)
    t = seen["t"]
    assert t.min() >= 0 and t.max() < 20 and len(t.unique()) == 20
    noise = (seen["x"] - module.diffusion.sqrt_alphas_cumprod[t, None, None, None] * x0) / (
        module.diffusion.sqrt_one_minus_alphas_cumprod[t, None, None, None]
    )
    assert abs(noise.std().item() - 1) < 0.05  # x_t − sqrt(ᾱ_t) x_0 is sqrt(1 − ᾱ_t) N(0, I)


def test_noisy_classifier_needs_a_timestep_input(tmp_path):
    with raises_in_config(ValueError, match="time_embed_dim"):
        instantiate(compose_config([*TINY_CLASSIFIER, "model.net.time_embed_dim=null"], tmp_path).model)


def labels_and_images(result):
    data = np.load(result["npz"])
    return data["labels"], data["arr_0"]


@pytest.mark.parametrize("sampler", ["sampler=ddim", "sampler=dpmpp_2m_sde"])
def test_sample_py_guides_with_the_classifier(checkpoint, classifier_run, tmp_path, sampler):
    """An unconditional model + classifier: labels cycle over the classifier's classes; s = 0 is plain sampling,
    s > 0 changes the images, reproducibly."""
    common = [sampler, "sampler.steps=5", "num_samples=4", f"classifier_ckpt={classifier_run['checkpoint']}"]
    plain = np.load(run(checkpoint, tmp_path / "plain", sampler, "sampler.steps=5", "num_samples=4")["npz"])["arr_0"]
    zero = labels_and_images(run(checkpoint, tmp_path / "zero", *common, "classifier_scale=0"))
    a = labels_and_images(run(checkpoint, tmp_path / "a", *common, "classifier_scale=30"))
    b = labels_and_images(run(checkpoint, tmp_path / "b", *common, "classifier_scale=30", "classes=[0,1,2,3]"))
    np.testing.assert_array_equal(zero[1], plain)
    np.testing.assert_array_equal(a[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.abs(a[1].astype(int) - plain.astype(int)).max() > 0
    info = json.loads((tmp_path / "a" / "samples.json").read_text())  # what guided the samples is recorded
    assert info["classifier_ckpt"] == str(classifier_run["checkpoint"]) and info["classifier_scale"] == 30.0
    saved = np.load(tmp_path / "a" / "samples.npz")
    assert float(saved["classifier_scale"]) == 30.0 and str(saved["classifier_ckpt"]) == info["classifier_ckpt"]


def test_eval_py_with_classifier_guidance(checkpoint, classifier_run, weights_dir, tmp_path):  # noqa: F811
    overrides = [f"ckpt={checkpoint}", "metrics=[fid]", "num_samples=8", "num_real=16", "batch_size=8"]
    overrides += ["sampler=ddim", "sampler.steps=4", f"classifier_ckpt={classifier_run['checkpoint']}"]
    report = evaluate(
        compose_config([*overrides, "classifier_scale=20", f"out={tmp_path / 'e.json'}"], tmp_path, "eval")
    )
    plain = evaluate(compose_config([*overrides, "classifier_scale=0", f"out={tmp_path / 'p.json'}"], tmp_path, "eval"))
    written = json.loads((tmp_path / "e.json").read_text())
    assert written["results"]["fid_fmnist_cls"] > 0 and written["classifier_scale"] == 20.0
    assert report["results"]["fid_fmnist_cls"] != plain["results"]["fid_fmnist_cls"]


def test_sample_py_errors(checkpoint, classifier_run, tmp_path):
    with pytest.raises(ValueError, match="classifier_scale=2 without classifier_ckpt: an unconditional model"):
        run(checkpoint, tmp_path, "classifier_scale=2")
    with pytest.raises(ValueError, match="noise-conditional classifier"):
        run(checkpoint, tmp_path, f"classifier_ckpt={checkpoint}")  # a diffusion checkpoint
    with pytest.raises(ValueError, match="mode=generate only"):
        ckpt = classifier_run["checkpoint"]
        run(checkpoint, tmp_path, "mode=reconstruct", "sampler=ddim", "sampler.steps=5", f"classifier_ckpt={ckpt}")
    with pytest.raises(ValueError, match="classifier_scale=-1"):
        run(checkpoint, tmp_path, f"classifier_ckpt={classifier_run['checkpoint']}", "classifier_scale=-1")


@pytest.mark.parametrize(
    "classifier_overrides, model_overrides, match",
    [
        (["schedule.num_timesteps=30"], [], "T=30 steps, the diffusion model has T=20"),
        (["schedule=cosine"], [], "noise schedule \\(cosine\\) differs from the diffusion model's \\(linear\\)"),
        (["data.image_size=8"], [], "shape \\[1, 8, 8\\].*\\[1, 16, 16\\]"),
        (["model.num_classes=5"], ["model=cfg"], "5 classes, the diffusion checkpoint's model 10"),
    ],
)
def test_mismatches_are_named(tmp_path, classifier_overrides, model_overrides, match):
    classifier = instantiate(compose_config([*TINY_CLASSIFIER, *classifier_overrides], tmp_path).model)
    model = instantiate(compose_config([*TINY, *model_overrides], tmp_path).model)
    with pytest.raises(ValueError, match=match):
        check_compatible(classifier, model, "c.ckpt")


def test_latent_diffusion_is_refused(tmp_path):
    classifier = instantiate(compose_config(TINY_CLASSIFIER, tmp_path).model)
    latent = LatentDiffusionModule.__new__(LatentDiffusionModule)  # only its type is read before the error
    with pytest.raises(ValueError, match="pixel-space diffusion only"):
        check_compatible(classifier, latent, "c.ckpt")


def test_an_edm_model_is_refused(tmp_path):
    classifier = instantiate(compose_config(TINY_CLASSIFIER, tmp_path).model)
    edm_tiny = [o for o in TINY if not o.startswith("schedule.")]  # a σ process has no discrete T
    edm = instantiate(compose_config([*edm_tiny, "model=edm"], tmp_path).model)
    with pytest.raises(ValueError, match="sigma process.*classifier-free guidance"):
        check_compatible(classifier, edm, "c.ckpt")


def test_conditional_model_without_classifier_suggests_cfg(tmp_path):
    from difflab.tasks.classifier_guidance import attach_classifier

    model = instantiate(compose_config([*TINY, "model=cfg"], tmp_path).model)
    cfg = compose_config(["ckpt=x", "classifier_scale=1"], tmp_path, "sample")
    with pytest.raises(ValueError, match="a class-conditional model has no classifier.*guidance_scale"):
        attach_classifier(cfg, model, torch.device("cpu"))


def test_the_study_script_runs_every_row(classifier_run, weights_dir, tmp_path):  # noqa: F811
    """experiments/guidance_editing/classifier_guidance.py on tiny checkpoints: a row per (guidance, scale) with
    FID, IS and accuracy; s = 0 of classifier guidance on the unconditional branch differs from w = 0 of CFG
    (the conditional model), and the guided rows differ from their s = 0 row."""
    import shutil

    from tests.conftest import load_experiment

    for name, ckpt in (
        ("cfg_model", train(compose_config([*TINY, "model=cfg", "trainer.max_steps=2"], tmp_path / "cfg"))),
        ("noisy_classifier", classifier_run),
    ):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copy(ckpt["checkpoint"], tmp_path / name / "checkpoints" / "last.ckpt")
    study = load_experiment("guidance_editing/classifier_guidance")
    out = tmp_path / "results.json"
    study.main(
        ["--run-dir", str(tmp_path), "--num-samples", "4", "--num-real", "16", "--steps", "3", "--batch-size", "4"]
        + ["--out", str(out)]
    )
    rows = json.loads(out.read_text())["rows"]
    assert [f"{r['guidance']}:{r['scale']:g}" for r in rows] == study.ORDER
    assert {(r["guidance"], r["scale"]) for r in rows} == {(k, s) for k, scales in study.ROWS.items() for s in scales}
    assert all(np.isfinite(r["fid_fmnist_cls"]) and 0 <= r["class_accuracy"] <= 1 for r in rows)
    fid = {(r["guidance"], r["scale"]): r["fid_fmnist_cls"] for r in rows}
    assert fid[("cg_uncond", 0.0)] != fid[("cfg", 0.0)] and fid[("cg_uncond", 30.0)] != fid[("cg_uncond", 0.0)]
    assert out.with_suffix(".png").is_file()

"""EDM and the score-SDE family through the entry points: model=edm / model=ncsn train (UNet and DiT, class-conditional
with CFG, every preconditioning, 2-process DDP), sample.py with every σ-space sampler, eval.py (FID, ode_nll), the
checkpoint's record of the preconditioning, and the error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from difflab.modules import EDMModule, LatentDiffusionModule, load_module
from difflab.tasks.eval import evaluate
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from tests.conftest import TINY, TINY_DIT, compose_config, raises_in_config
from tests.integration.test_ldm import ddp_cpu_run
from tests.unit.test_metrics import weights_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.xdist_group("test_edm")  # the module-scoped checkpoint is trained once

# the σ processes have no discrete T: the tiny configs without schedule.num_timesteps
EDM_TINY = [o for o in TINY if not o.startswith("schedule.")]
EDM_TINY_DIT = [o for o in TINY_DIT if not o.startswith("schedule.")]
CONDITIONAL = ["model.num_classes=${data_num_classes:}", "model.p_uncond=0.2", "model.guidance_scale=1.5"]
QUIET = ["callbacks.sample_grid=null", "samples.num_samples=0"]


@pytest.mark.parametrize("net", ["unet", "dit"])
@pytest.mark.parametrize("conditional", [False, True], ids=["uncond", "cfg"])
def test_fast_dev_run_edm(tmp_path, net, conditional):
    base = EDM_TINY if net == "unet" else EDM_TINY_DIT
    extra = CONDITIONAL if conditional else []
    overrides = [*base, "model=edm", "debug=fast", "samples.num_samples=4", "sampler.steps=3", *extra]
    result = train(compose_config(overrides, tmp_path))
    assert np.isfinite(result["metrics"]["train/loss"]) and result["grid"].is_file()


@pytest.mark.parametrize("preconditioning", ["vp", "subvp", "ve", "iddpm"])
def test_every_preconditioning_trains_and_samples(tmp_path, preconditioning):
    overrides = [*EDM_TINY, "model=edm", f"schedule.preconditioning={preconditioning}", "debug=fast"]
    result = train(compose_config([*overrides, "samples.num_samples=4", "sampler.steps=3"], tmp_path))
    assert np.isfinite(result["metrics"]["train/loss"])
    assert np.isfinite(np.load(result["npz"])["arr_0"]).all()


def test_ncsn_trains_with_the_ve_process_and_samples_by_predictor_corrector(tmp_path):
    cfg = compose_config([*EDM_TINY, "model=ncsn", "debug=fast", "samples.num_samples=4", "sampler.steps=3"], tmp_path)
    assert cfg.model.schedule.preconditioning == "ve" and cfg.model.schedule.sigma_max == 25.1
    assert cfg.sampler._target_.endswith("PredictorCorrectorSampler")
    result = train(cfg)
    assert np.isfinite(result["metrics"]["train/loss"]) and result["grid"].is_file()


@pytest.fixture(scope="module")
def edm_ckpt(tmp_path_factory):
    """A class-conditional EDM trained 3 steps (its weights moved off the zero-initialised output layer)."""
    out = tmp_path_factory.mktemp("edm")
    overrides = [*EDM_TINY, *QUIET, *CONDITIONAL, "model=edm", "trainer.max_steps=3", "model.optimizer.lr=0.05"]
    return train(compose_config(overrides, out))["checkpoint"]


def test_the_checkpoint_records_the_preconditioning(edm_ckpt):
    module, record = load_module(edm_ckpt)
    assert isinstance(module, EDMModule) and module.diffusion.preconditioning.value == "edm"
    assert record["config"]["schedule"]["preconditioning"] == "edm"
    assert module.diffusion.sigma_data == 0.5 and (module.diffusion.P_mean, module.diffusion.P_std) == (-1.2, 1.2)


@pytest.mark.parametrize(
    "sampler, steps",
    [("edm", 3), ("heun", 3), ("pc", 3), ("langevin", 3), ("ode", None), ("dpmpp_2m", 3), ("euler_ancestral", 3)],
)
def test_sample_py_draws_with_every_sigma_space_sampler(edm_ckpt, tmp_path, sampler, steps):
    extra = [f"sampler.steps={steps}"] if steps else ["sampler.rtol=1e-2", "sampler.atol=1e-2"]
    cfg = compose_config([f"ckpt={edm_ckpt}", "num_samples=6", f"sampler={sampler}", *extra], tmp_path, "sample")
    result = sample(cfg)
    images = np.load(result["npz"])["arr_0"]
    assert images.shape == (6, 16, 16, 1) and np.isfinite(images).all()
    assert result["summary"]["nfe"] > 0  # the adaptive ODE reports its solver's count


def test_sample_py_default_and_guidance_on_an_edm_checkpoint(edm_ckpt, tmp_path):
    cfg = compose_config([f"ckpt={edm_ckpt}", "num_samples=4", "guidance_scale=2.0"], tmp_path, "sample")
    info = json.loads(Path(sample(cfg)["json"]).read_text())
    assert info["sampler_name"] == "DPMSolverSDESampler" and info["guidance_scale"] == 2.0


def test_a_discrete_sampler_on_an_edm_checkpoint_names_the_sigma_samplers(edm_ckpt, tmp_path):
    with raises_in_config(ValueError, match="sampler=heun | edm"):
        sample(compose_config([f"ckpt={edm_ckpt}", "num_samples=2", "sampler=ddim"], tmp_path, "sample"))


@pytest.mark.parametrize("mode", ["mode=reconstruct", "mode=interpolate", "mode=inpaint"])
def test_editing_modes_on_an_edm_checkpoint_are_refused(edm_ckpt, tmp_path, mode):
    with pytest.raises(ValueError, match="mode=generate"):
        sample(compose_config([f"ckpt={edm_ckpt}", "num_samples=2", mode], tmp_path, "sample"))


def test_export_of_an_edm_checkpoint(edm_ckpt, tmp_path):
    from difflab.tasks.export import export

    with raises_in_config(ValueError, match="format=safetensors"):
        export(compose_config([f"ckpt={edm_ckpt}", "format=diffusers", f"out={tmp_path / 'd'}"], tmp_path, "export"))
    export(compose_config([f"ckpt={edm_ckpt}", "format=safetensors", f"out={tmp_path / 's'}"], tmp_path, "export"))
    assert any((tmp_path / "s").iterdir())


def test_eval_fid_and_ode_nll_on_an_edm_checkpoint(edm_ckpt, tmp_path, weights_dir):  # noqa: F811
    overrides = [f"ckpt={edm_ckpt}", "num_samples=8", "num_real=16", "batch_size=4", "sampler=heun", "sampler.steps=2"]
    nll = ["ode_nll_images=3", "ode_nll_rtol=1e-2", "ode_nll_atol=1e-2"]
    report = evaluate(compose_config([*overrides, "metrics=[fid,ode_nll]", *nll], tmp_path / "eval", "eval"))
    results = report["results"]
    assert results["fid_fmnist_cls"] > 0 and results["ode_nll_images"] == 3
    assert 0 < results["ode_nll_bpd"] < 20 and results["ode_nll_bpd_se"] >= 0 and results["ode_nll_nfe"] > 0
    with pytest.raises(ValueError, match="ode_nll"):  # the VLB is a discrete diffusion's
        evaluate(compose_config([overrides[0], "metrics=[nll]", "nll_images=2"], tmp_path / "nll", "eval"))


def test_ddp_cpu_edm(tmp_path):
    run_dir, checkpoint = ddp_cpu_run(tmp_path, *EDM_TINY, "model=edm", "trainer.max_steps=2", "sampler.steps=2")
    assert checkpoint["global_step"] == 2 and (run_dir / "samples" / "samples.png").is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["schedule=edm"], "model=edm"),  # a σ process under the DDPM module
        (["model=edm", "model.parameterization=eps"], "model.parameterization=eps"),
        (["model=edm", "schedule=linear"], "schedule=edm"),
        (["model=edm", "schedule.preconditioning=ncsn"], "model.schedule.preconditioning"),
        (["model=edm", "schedule.sigma_min=10", "schedule.sigma_max=1"], "sigma_min"),
        (["model=edm", "sampler=edm", "sampler.S_churn=-1"], "S_churn"),
        (["model=ncsn", "sampler.snr=0"], "snr"),
        (["model=rectified_flow", "sampler=langevin"], "flow_euler"),  # Langevin needs a score: a flow has none
        (["model=rectified_flow", "sampler=pc"], "flow_euler"),
        (
            ["model=edm", "+model.timestep_sampler._target_=difflab.losses.UniformTimestepSampler"]
            + ["+model.timestep_sampler._partial_=true"],
            "timestep_sampler",
        ),
    ],
)
def test_bad_settings_fail_at_construction_naming_the_key(tmp_path, overrides, message):
    cfg = compose_config([*EDM_TINY, *overrides], tmp_path)
    with raises_in_config(ValueError, match=message):
        instantiate(cfg.model)


def test_ode_nll_of_a_latent_model_is_refused():
    with pytest.raises(ValueError, match="autoencoder"):
        LatentDiffusionModule.ode_nll(object(), torch.zeros(1, 1, 8, 8))


def test_reconstruction_metrics_on_an_edm_model_fail_before_training(tmp_path):
    overrides = [*EDM_TINY, "model=edm", "callbacks=[default,reconstruction_metrics]", "debug=fast"]
    with pytest.raises(ValueError, match="DDIM encode-decode"):
        train(compose_config(overrides, tmp_path))


def test_ode_nll_and_ode_sampling_of_a_ddpm_and_a_flow_checkpoint(tiny_checkpoint, tmp_path):
    """metrics=[ode_nll] takes every process with an ODE: a discrete DDPM (sampler=ode) and a rectified flow
    (flow_ode), next to the DDPM's VLB; sampler=ode on the DDPM and flow_ode on the flow draw images."""
    flow_overrides = [*TINY, *QUIET, "model=rectified_flow", "trainer.max_steps=2", "trainer.limit_train_batches=2"]
    flow = train(compose_config(flow_overrides, tmp_path / "flow"))["checkpoint"]
    nll = ["metrics=[ode_nll]", "ode_nll_images=2", "ode_nll_rtol=1e-2", "ode_nll_atol=1e-2", "batch_size=2"]
    for name, ckpt in (("ddpm", tiny_checkpoint), ("flow", flow)):
        results = evaluate(compose_config([f"ckpt={ckpt}", *nll], tmp_path / name, "eval"))["results"]
        assert 0 < results["ode_nll_bpd"] < 30 and results["ode_nll_nfe"] > 0, name
    for ckpt, sampler in ((tiny_checkpoint, "ode"), (flow, "flow_ode")):
        overrides = [f"ckpt={ckpt}", "num_samples=3", f"sampler={sampler}", "sampler.rtol=1e-2", "sampler.atol=1e-2"]
        images = np.load(sample(compose_config(overrides, tmp_path / sampler, "sample"))["npz"])["arr_0"]
        assert images.shape[0] == 3 and np.isfinite(images).all()


def test_the_nll_callback_refuses_an_edm_model_naming_ode_nll(tmp_path):
    cfg = compose_config([*EDM_TINY, "model=edm", "callbacks=[default,nll]", "debug=fast"], tmp_path)
    with pytest.raises(ValueError, match="EDM-family.*metrics=\\[ode_nll\\]"):
        train(cfg)

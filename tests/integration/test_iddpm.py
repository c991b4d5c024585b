"""Improved DDPM end to end on CPU: each loss type trains, the importance sampler survives resume, NLL."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from difflab.losses import LossAwareTimestepSampler
from difflab.tasks.train import train
from tests.conftest import raises_in_config


@pytest.mark.parametrize("model", ["iddpm", "iddpm_vlb"])
def test_fast_dev_run_iddpm_losses(tiny_cfg, model):
    result = train(tiny_cfg(f"model={model}", "schedule=cosine", "debug=fast", "samples.num_samples=2"))
    assert np.isfinite(result["metrics"]["train/loss"])


def test_learned_variance_with_simple_loss_is_refused(tiny_cfg):
    cfg = tiny_cfg("model=iddpm", "model.loss.loss_type=simple")
    with raises_in_config(ValueError, match="L_simple does not train"):
        instantiate(cfg.model)


def test_importance_sampler_state_survives_checkpoint_and_resume(tiny_cfg, tmp_path):
    common = ["model=iddpm_vlb", "trainer.limit_train_batches=3", "model.timestep_sampler.history=1"]
    first = train(tiny_cfg(*common, "trainer.max_steps=3", output_dir=tmp_path / "a"))
    saved = torch.load(first["checkpoint"], weights_only=True)["timestep_sampler"]
    assert int(saved["loss_counts"].sum()) == 3 * 16
    second = train(
        tiny_cfg(*common, "trainer.max_steps=6", f"ckpt_path={first['checkpoint']}", output_dir=tmp_path / "b")
    )
    resumed = torch.load(second["checkpoint"], weights_only=True)["timestep_sampler"]
    assert int(resumed["loss_counts"].sum()) == 6 * 16  # continued from the saved history, not from zero
    sampler = LossAwareTimestepSampler(20, history=1)
    sampler.load_state_dict(resumed)
    assert sampler.probabilities().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_full_chain_vlb_equals_the_sum_of_training_terms(tiny_cfg):
    cfg = tiny_cfg("model=iddpm", "schedule=cosine")
    module = instantiate(cfg.model).eval()
    x0 = torch.rand(3, *module.image_shape) * 2 - 1
    chain = module.nll(x0, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)  # the same draws, in the same order (t = T−1 … 0)
    module.loss_fn.loss_type = type(module.loss_fn.loss_type)("vlb")
    total = torch.zeros(3)
    with torch.no_grad():
        for t in range(module.diffusion.num_timesteps - 1, -1, -1):
            noise = torch.randn(x0.shape, generator=gen)
            vb = module.diffusion_loss(x0, None, torch.full((3,), t), noise)["vb"]
            torch.testing.assert_close(vb, chain["vb"][:, t])
            total += vb
    torch.testing.assert_close(chain["total_bpd"], total + chain["prior_bpd"])
    torch.testing.assert_close(chain["decoder_bpd"], chain["vb"][:, 0])
    assert torch.all(chain["total_bpd"] > 0)


def test_nll_callback_logs_bits_per_dim(tiny_cfg):
    result = train(
        tiny_cfg(
            "model=iddpm",
            "+callbacks.nll._target_=difflab.callbacks.NLLCallback",
            "+callbacks.nll.every_n_epochs=1",
            "+callbacks.nll.num_images=4",
            "trainer.max_steps=2",
            "trainer.limit_train_batches=2",
        )
    )
    metrics = result["metrics"]
    assert metrics["val/nll_bpd"] > metrics["val/nll_decoder_bpd"] > 0
    assert 0 < metrics["val/nll_prior_bpd"] < metrics["val/nll_bpd"]

"""Training lowers the loss, for every method, in seconds: each model of the tiny config fits a few dozen steps of
8x8 digits (resized) through Lightning, and the loss of one fixed validation batch — with fixed t and ε for the
diffusion models (``_eval_loss``), the L1 reconstruction error for the autoencoder — must fall well below its value
at initialisation. A model whose gradients do not reach its parameters, or whose optimizer is not stepped, fails.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import TINY, TINY_DIT, TINY_UPSCALER, bare_trainer, compose_config

FAST = ["model.optimizer.lr=2e-3", "model.lr_scheduler.warmup_steps=1"]
AE = [
    "data=digits",
    "data.batch_size=16",
    "model=autoencoder",
    "autoencoder.ch=8",
    "autoencoder.ch_mult=[1,2]",
    "autoencoder.num_groups=4",
    "model.discriminator.ch=8",
    "model.discriminator.num_groups=4",
    "model.loss.disc_start=1000",  # reconstruction and KL only within these steps
    "model.loss.perceptual=none",
    "model.optimizer.lr=2e-3",
    "trainer=cpu",
]


def fit_and_measure(overrides: list[str], steps: int, tmp_path, measure) -> tuple[float, float]:
    """(before, after): ``measure(module, batch)`` on the first validation batch, before and after ``steps`` steps."""
    cfg = compose_config(overrides, tmp_path)
    torch.manual_seed(0)
    module, datamodule = instantiate(cfg.model), instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    before = measure(module.eval(), batch)
    bare_trainer(max_steps=steps).fit(module.train(), datamodule)
    return before, measure(module.eval(), batch)


@torch.no_grad()
def diffusion_loss(module, batch) -> float:
    """L_simple (or the model's loss) at t and ε seeded by the batch index: the same draw before and after."""
    if hasattr(module, "scale_set") and not module.scale_set:
        module._set_scale(batch[0])  # what the first training step does (scale_by_std), so both use one scale
    return module._eval_loss(batch, 0).item()


@pytest.mark.parametrize(
    "method, base, overrides",
    [
        ("ddpm", TINY, ["model=ddpm"]),
        ("iddpm", TINY, ["model=iddpm", "schedule=cosine"]),  # L_hybrid: learned-range Σ
        ("cfg", TINY, ["model=cfg"]),  # class-conditional with label dropout
        ("ddpm_dit", TINY_DIT, ["model=ddpm"]),  # the DiT inside the diffusion module
        ("rectified_flow", TINY, ["model=rectified_flow"]),  # the velocity regression
        # conditioned on the noised, upsampled low-res batch (8 → 16 here: 32x32 costs 4x the time)
        ("upscaler", TINY_UPSCALER, ["data.image_size=16", "model.low_res_size=8", "net.attention_resolutions=[8]"]),
    ],
)
def test_training_lowers_the_diffusion_loss(method, base, overrides, tmp_path):
    before, after = fit_and_measure([*base, *FAST, *overrides], 40, tmp_path, diffusion_loss)
    assert after < 0.6 * before, (method, before, after)


def test_noisy_classifier_training_lowers_the_cross_entropy(tmp_path):
    """On x_t of fixed (t, ε) draws (the validation's, seeded by the batch index): ln 10 ≈ 2.29 → 1.6 in 120 steps
    (its GroupNorm + FiLM net starts slower than the diffusion models: 40 steps barely move it)."""
    from tests.integration.test_classifier_guidance import TINY_CLASSIFIER

    @torch.no_grad()
    def cross_entropy(module, batch) -> float:
        x, y = batch
        return torch.nn.functional.cross_entropy(module.batch_logits(x, "val", 0), y).item()

    overrides = [*TINY_CLASSIFIER, "model.optimizer.lr=2e-3", "model.lr_scheduler=null"]
    before, after = fit_and_measure(overrides, 120, tmp_path, cross_entropy)
    assert after < 0.8 * before, (before, after)


def test_autoencoder_training_lowers_the_reconstruction_error(tmp_path):
    @torch.no_grad()
    def l1(module, batch) -> float:
        return (module(batch[0]) - batch[0]).abs().mean().item()

    before, after = fit_and_measure(AE, 40, tmp_path, l1)
    assert after < 0.6 * before, (before, after)


def test_latent_diffusion_training_lowers_the_loss(tmp_path):
    """Stage 2 on the shipped Fashion-MNIST kl-f4 stage 1 (digits at 32x32: 8x8x3 latents), class-conditional."""
    overrides = [
        *TINY,
        *FAST,
        "model=ldm",
        "model.autoencoder_ckpt=shipped:ae_kl_f4_fmnist",
        "data.image_size=32",
        "net.attention_resolutions=[4]",
        "net.num_head_channels=-1",
        "net.num_heads=2",
        "conditioner.context_dim=16",
    ]
    before, after = fit_and_measure(overrides, 40, tmp_path, diffusion_loss)
    assert after < 0.8 * before, (before, after)  # 1.01 → 0.60 here (pixel models: ≈ 1 → 0.25)

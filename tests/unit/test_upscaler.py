"""The cascade's upscaler: conditioning by concatenation, the noise-augmentation level and its embedding path."""

from __future__ import annotations

import pytest
import torch

from difflab.modules import UpscalerModule
from difflab.modules.upscaler import downsample, upsample
from difflab.schedules import GaussianDiffusion
from tests.conftest import TINY_NETS, perturb_weights


def upscaler(net: str = "unet", **kwargs) -> UpscalerModule:
    torch.manual_seed(0)
    defaults = {"low_res_size": 4, "aug_levels": 20, "sample_aug_level": 3}
    return UpscalerModule(
        net=TINY_NETS[net],
        schedule=GaussianDiffusion(num_timesteps=50),
        image_shape=(1, 8, 8),
        optimizer=torch.optim.Adam,
        **{**defaults, **kwargs},
    )


@pytest.mark.parametrize("net", ["unet", "dit"])
def test_the_net_sees_x_t_and_the_low_res_image_and_the_level(net):
    module = upscaler(net)
    first = module.net.input_blocks[0][0] if net == "unet" else module.net.patch_embed.proj
    assert first.in_channels == 2  # x_t ⊕ c_a
    assert module.num_classes is None  # not class-conditional: the class table holds the levels
    table = module.net.class_embed if net == "unet" else module.net.embed.class_table
    assert table.num_embeddings == 20 + 1
    perturb_weights(module)
    x_t, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 5, 5])
    cond = module.low_res_condition(torch.randn(3, 1, 4, 4), 2, torch.Generator().manual_seed(0))
    assert cond[0].shape == (3, 1, 8, 8) and cond[1].tolist() == [2, 2, 2]
    out = module(x_t, t, cond)
    assert out.shape == (3, 1, 8, 8)
    assert not torch.allclose(out, module(x_t, t, (cond[0], torch.tensor([7, 7, 7]))))  # the level reaches the net
    assert not torch.allclose(out, module(x_t, t, (torch.zeros_like(cond[0]), cond[1])))  # and the image


def test_augmentation_level_is_q_sample_of_the_upsampled_image():
    """c_a = sqrt(ᾱ_a) up(x_low) + sqrt(1 − ᾱ_a) z: on a constant image, mean and std give ᾱ_a back."""
    module = upscaler(aug_levels=50)
    low = torch.full((256, 1, 4, 4), 0.5)
    for level in (0, 10, 49):
        cond, a = module.low_res_condition(low, level, torch.Generator().manual_seed(level))
        ab = module.diffusion.alphas_cumprod_64[level].item()
        assert cond.mean().item() == pytest.approx(0.5 * ab**0.5, abs=0.03)
        assert cond.std().item() == pytest.approx((1 - ab) ** 0.5, rel=0.05)
        assert a.tolist() == [level] * 256
    _, drawn = module.low_res_condition(torch.zeros(4000, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert drawn.min() == 0 and drawn.max() == 49  # training: uniform over [0, aug_levels)
    assert drawn.float().mean().item() == pytest.approx(24.5, abs=1.0)


def test_training_conditions_on_the_batch_downsampled():
    """The condition is c_a = sqrt(ᾱ_a) up(down(x)) + sqrt(1 − ᾱ_a) z of *this* batch: its residual against the
    batch's own low-res image is unit Gaussian noise (a zero or another batch's condition is far from it)."""
    module = upscaler(aug_levels=10)
    seen = {}

    def spy(x_t, t, y):
        seen["y"] = y
        return torch.zeros_like(x_t)

    module.denoise = spy
    x = torch.rand(512, 1, 8, 8) * 2 - 1
    module.log = lambda *a, **k: None
    module.training_step((x, torch.zeros(512, dtype=torch.long)), 0)
    cond, level = seen["y"]
    assert cond.shape == x.shape and level.shape == (512,) and 0 <= level.min() and level.max() < 10
    assert module.reference is not None and module.reference.shape == (64, 1, 8, 8)
    ab = module.diffusion.alphas_cumprod[level].reshape(-1, 1, 1, 1)
    up = upsample(downsample(x, 4), 8)
    residual = (cond - ab.sqrt() * up) / (1 - ab).sqrt()
    assert residual.mean().abs() < 0.02 and residual.std().item() == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("net", ["unet", "dit"])
def test_upscaled_images_follow_the_low_res_input(net):
    """Same noise, other low-res images: other outputs; the same low-res images: the same outputs."""
    module = upscaler(net)
    perturb_weights(module, scale=0.1)
    a = torch.rand(4, 1, 4, 4) * 2 - 1
    b = -a
    draw = lambda low: module.upscale(low, torch.Generator().manual_seed(0), aug_level=0, num_steps=5)  # noqa: E731
    from_a, from_b = draw(a), draw(b)
    torch.testing.assert_close(draw(a), from_a)
    assert (from_a - from_b).abs().mean() > 0.05


def test_upscale_samples_at_the_output_size():
    module = upscaler()
    images = module.upscale(torch.zeros(3, 1, 4, 4), torch.Generator().manual_seed(0), aug_level=0)
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1


def test_upscaler_errors():
    with pytest.raises(ValueError, match="low_res_size"):
        upscaler(low_res_size=8)
    with pytest.raises(ValueError, match="aug_levels"):
        upscaler(aug_levels=51)
    with pytest.raises(ValueError, match="aug_level"):
        upscaler(sample_aug_level=20)
    with pytest.raises(ValueError, match="num_classes"):
        upscaler(num_classes=10)
    module = upscaler()
    with pytest.raises(ValueError, match="low-res input"):
        module.upscale(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="mode=cascade"):
        module.sample(2)  # nothing to upscale: an upscaler alone needs its base

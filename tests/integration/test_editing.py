"""sample.py mode=inpaint | img2img | cascade end to end on tiny checkpoints, model=upscaler training, error paths."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from difflab.tasks.sample import sample
from difflab.tasks.train import train
from tests.conftest import TINY_UPSCALER, compose_config

SHORT = ["trainer.max_steps=2", "trainer.limit_train_batches=2"]


@pytest.fixture
def checkpoints(tiny_checkpoint, tiny_cfg_checkpoint, tiny_upscaler_checkpoint):
    """A tiny 16x16 DDPM, a class-conditional one (CFG) and a 16 → 32 upscaler on digits (the session's)."""
    return {"base": tiny_checkpoint, "cfg": tiny_cfg_checkpoint, "upscaler": tiny_upscaler_checkpoint}


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A 20x12 grayscale PNG (resized and centre-cropped to 16x16 by the loader) and its uint8 16x16 version."""
    path = tmp_path_factory.mktemp("inputs") / "input.png"
    pixels = (np.random.default_rng(0).random((12, 20)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    from difflab.data.image_folder import load_image

    return path, load_image(path, 1, 16)[0].numpy()


def run(ckpt, tmp_path, *overrides):
    return sample(compose_config([f"ckpt={ckpt}", *overrides], tmp_path, "sample"))


def test_inpaint_keeps_the_known_pixels_with_repaint(checkpoints, image, tmp_path):
    path, pixels = image
    overrides = ["mode=inpaint", f"image={path}", "mask=[2,3,10,12]", "sampler=ddpm", "sampler.steps=6"]
    result = run(checkpoints["base"], tmp_path, *overrides, "resample_jumps=2", "resample_times=2", "variants=2")
    out = np.load(result["npz"])["arr_0"]
    assert out.shape == (2, 16, 16, 1)
    known = np.ones((16, 16), dtype=bool)
    known[3:12, 2:10] = False  # rows y0:y1, columns x0:x1
    for k in range(2):
        np.testing.assert_array_equal(out[k, ..., 0][known], pixels[known])
    assert not np.array_equal(out[0, ..., 0][~known], pixels[~known])
    assert result["nfe"] == 6 + 2 * 1 * 2  # RePaint: jumps at 0 and 2, each 2 levels re-denoised once
    assert result["grid"].is_file()


def test_inpaint_with_a_mask_png_and_ddim(checkpoints, image, tmp_path):
    path, pixels = image
    mask = np.zeros((12, 20), dtype=np.uint8)
    mask[:, 10:] = 255  # fill the right half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    overrides = ["mode=inpaint", f"image={path}", f"mask={tmp_path / 'mask.png'}", "sampler=ddim", "sampler.steps=4"]
    out = np.load(run(checkpoints["base"], tmp_path, *overrides, "variants=1")["npz"])["arr_0"]
    np.testing.assert_array_equal(out[0, :, :5, 0], pixels[:, :5])  # the left of the centre crop is kept


def test_img2img_strength_zero_cfg_and_inversion(checkpoints, image, tmp_path):
    path, pixels = image
    base = ["mode=img2img", f"image={path}", "variants=2"]
    same = run(checkpoints["base"], tmp_path / "zero", *base, "strength=0", "sampler=ddpm")
    np.testing.assert_array_equal(np.load(same["npz"])["arr_0"][..., 0], np.stack([pixels, pixels]))
    guided = [*base, "strength=0.6", "sampler=ddim", "sampler.steps=5", "guidance_scale=2", "classes=[3]"]
    result = run(checkpoints["cfg"], tmp_path / "cfg", *guided)
    assert np.load(result["npz"])["labels"].tolist() == [3, 3]
    # Issue 28, point 10: DDIM inversion then η = 0 decoding is deterministic, so variants were identical copies
    inverted = run(checkpoints["base"], tmp_path / "inv", *base, "start=invert", "sampler=ddim", "sampler.steps=5")
    assert np.load(inverted["npz"])["arr_0"].shape == (1, 16, 16, 1)
    varied = [*base, "start=invert", "sampler=ddim", "sampler.steps=5", "sampler.eta=1"]
    two = np.load(run(checkpoints["base"], tmp_path / "inv_eta", *varied)["npz"])["arr_0"]
    assert two.shape == (2, 16, 16, 1) and not np.array_equal(two[0], two[1])


def test_cascade_upscales_base_samples(checkpoints, tmp_path):
    overrides = [f"upscaler_ckpt={checkpoints['upscaler']}", "mode=cascade", "num_samples=3", "sampler=ddim"]
    result = run(checkpoints["base"], tmp_path, *overrides, "sampler.steps=3", "aug_level=1")
    assert np.load(result["npz"])["arr_0"].shape == (3, 32, 32, 1)
    assert np.load(result["base_npz"])["arr_0"].shape == (3, 16, 16, 1)
    assert result["grid"].is_file()


def test_editing_errors(checkpoints, image, tmp_path):
    path, _ = image
    base, upscaler = checkpoints["base"], checkpoints["upscaler"]
    with pytest.raises(FileNotFoundError, match="image="):
        run(base, tmp_path, "mode=img2img", f"image={tmp_path / 'missing.png'}", "sampler=ddpm")
    with pytest.raises(ValueError, match="strength"):
        run(base, tmp_path, "mode=img2img", f"image={path}", "strength=1.5", "sampler=ddpm")
    with pytest.raises(ValueError, match="sampler=ddpm"):  # the default solver cannot restart mid-chain
        run(base, tmp_path, "mode=img2img", f"image={path}")
    with pytest.raises(ValueError, match="does not take text"):  # a class-conditional model: classes=, not prompt=
        run(checkpoints["cfg"], tmp_path, "mode=img2img", f"image={path}", "strength=0.5", "sampler=ddpm", "prompt=a")
    with pytest.raises(ValueError, match="does not take text"):
        run(base, tmp_path, "mode=cascade", f"upscaler_ckpt={upscaler}", "prompt=a", "sampler=ddpm")
    with pytest.raises(ValueError, match="does not take text"):  # generation too: the same module-level refusal
        run(base, tmp_path, "prompt=a", "num_samples=2", "sampler=ddim", "sampler.steps=2")
    with pytest.raises(ValueError, match="box"):
        run(base, tmp_path, "mode=inpaint", f"image={path}", "mask=[0,0,17,4]", "sampler=ddpm")
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="16x16, but image="):
        run(base, tmp_path, "mode=inpaint", f"image={path}", f"mask={tmp_path / 'small.png'}", "sampler=ddpm")
    with pytest.raises(ValueError, match="needs mask"):
        run(base, tmp_path, "mode=inpaint", f"image={path}", "sampler=ddpm")
    with pytest.raises(ValueError, match="upscaler_ckpt"):
        run(base, tmp_path, "mode=cascade")
    with pytest.raises(ValueError, match="ckpt= is an upscaler"):
        run(upscaler, tmp_path, "mode=cascade", f"upscaler_ckpt={upscaler}")
    with pytest.raises(ValueError, match="not an upscaler"):
        run(base, tmp_path, "mode=cascade", f"upscaler_ckpt={base}")
    with pytest.raises(ValueError, match="mode=cascade"):  # an upscaler alone: nothing to upscale
        run(upscaler, tmp_path, "num_samples=2")


def test_fast_dev_run_upscaler(tmp_path):
    """One batch; the samples after fit are upscales of that batch's low-res versions (32x32)."""
    result = train(compose_config([*TINY_UPSCALER, "debug=fast"], tmp_path))
    assert np.isfinite(result["metrics"]["train/loss"])
    assert np.load(result["npz"])["arr_0"].shape == (4, 32, 32, 1)

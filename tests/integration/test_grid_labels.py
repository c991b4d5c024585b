"""Issue 22, point 7: grids say what they show (class names / prompts on rows or columns, original/reconstruction
columns), and the npz and a JSON beside it record the classes, prompts, sampler and guidance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.tasks.sample import sample
from difflab.utils.images import image_grid
from difflab.utils.labels import grid_axes, save_labelled_grid
from tests.conftest import TINY, compose_config


@pytest.fixture
def cfg_ckpt(tiny_cfg_checkpoint) -> str:
    return tiny_cfg_checkpoint


def test_grid_axes_finds_uniform_rows_or_columns():
    assert grid_axes(["a", "a", "b", "b"], 2) == (["a", "b"], None)
    assert grid_axes(["x", "y", "x", "y", "x"], 2) == (None, ["x", "y"])  # the last row is short
    assert grid_axes(["a", "b", "b", "a"], 2) == (None, None)


def test_labels_add_a_margin_with_text_and_keep_the_images(tmp_path):
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    plain = image_grid(images, 2)  # (3, 20, 20) in [0, 1]
    path = save_labelled_grid(images, tmp_path / "g.png", nrow=2, tags=["sneaker"] * 2 + ["bag"] * 2, min_width=0)
    picture = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    height, width = plain.shape[1:]
    assert picture.shape[0] == height and picture.shape[1] > width  # a left margin for the row labels
    margin = picture[:, : picture.shape[1] - width]
    assert (margin < 128).any() and (margin > 250).any()  # dark text on white
    expected = (plain[0].numpy() * 255).round()
    np.testing.assert_allclose(picture[:, -width:], expected, atol=1)  # the grid itself is unchanged
    unlabelled = save_labelled_grid(images, tmp_path / "u.png", nrow=2, tags=None, min_width=0)
    assert Image.open(unlabelled).size == (width, height)


def test_small_grids_are_enlarged_sharply_and_mixed_tags_caption_each_tile(tmp_path):
    """64 samples at 16x16 made a 146 px picture: enlarged by a whole factor to >= 512 px, nearest-neighbour (each
    pixel a square of the same value); tags that follow neither rows nor columns caption every tile."""
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    plain = (image_grid(images, 2)[0].numpy() * 255).round()  # 22x22 (8 px tiles, 2 px padding)
    picture = np.asarray(Image.open(save_labelled_grid(images, tmp_path / "big.png", nrow=2)).convert("L"))
    assert picture.shape == (528, 528)  # 22 px x 24 >= 512
    np.testing.assert_allclose(picture, np.kron(plain, np.ones((24, 24))), atol=1)
    mixed = ["sneaker", "bag", "bag", "sneaker"]  # classes=[7,8,8,7]-like: neither rows nor columns agree
    captioned = np.asarray(Image.open(save_labelled_grid(images, tmp_path / "c.png", nrow=2, tags=mixed)).convert("L"))
    assert captioned.shape == (528 + 2 * 14, 528)  # a caption band above each row
    for band in (captioned[:14], captioned[254:268]):  # above each row of 240 px (a 10 px step x 24), text on white
        assert (band < 128).any() and (band > 250).mean() > 0.8


def test_classes_all_grid_rows_npz_and_json_say_what_they_show(cfg_ckpt, tmp_path):
    args = [f"ckpt={cfg_ckpt}", "classes=all", "num_samples=20", "sampler=ddim", "sampler.steps=2", "guidance_scale=2"]
    result = sample(compose_config(args, tmp_path, "sample"))
    saved = np.load(result["npz"])  # no pickle needed
    assert str(saved["sampler"]) == "DDIMSampler" and float(saved["guidance_scale"]) == 2.0
    assert list(saved["class_names"][:2]) == ["handwritten zero", "handwritten one"]
    assert saved["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    assert json.loads(str(saved["sampler_config"]))["steps"] == 2
    info = json.loads((tmp_path / "samples.json").read_text())
    assert info["guidance_scale"] == 2.0 and info["sampler_name"] == "DDIMSampler" and info["labels"][:3] == [0, 0, 1]
    assert info["class_names"][9] == "handwritten nine" and info["prompts"] is None
    grid = Image.open(result["grid"])
    assert grid.width > image_grid(torch.zeros(20, 1, 16, 16), 2).shape[2]  # the class-name margin


def test_reconstruct_grid_has_labelled_columns(cfg_ckpt, tmp_path):
    args = [f"ckpt={cfg_ckpt}", "mode=reconstruct", "sampler=ddim", "sampler.steps=2", "num_samples=4"]
    result = sample(compose_config(args, tmp_path, "sample"))
    grid = Image.open(result["grid"])
    plain = image_grid(torch.zeros(8, 1, 16, 16), 4)  # digits at the tiny config's 16x16
    scale = -(-512 // plain.shape[2])  # enlarged to >= 512 px
    assert grid.width == plain.shape[2] * scale and grid.height > plain.shape[1] * scale  # a header above columns


def test_prompts_are_tags_and_npz_arrays():
    from difflab.tasks.sample_info import image_tags, npz_arrays

    prompts = ["a photo of a sneaker", "a photo of a bag"] * 2
    assert image_tags(None, prompts, None) == prompts
    assert grid_axes(prompts, 2) == (None, ["a photo of a sneaker", "a photo of a bag"])  # one prompt per column
    assert image_tags(torch.tensor([1, 0]), None, None) == ["class 1", "class 0"]  # no names: the indices
    info = {"sampler_name": "DDIMSampler", "sampler": {"steps": 2}, "guidance_scale": None, "class_names": None}
    arrays = npz_arrays({**info, "prompts": prompts})
    assert arrays["prompts"].tolist() == prompts and "guidance_scale" not in arrays and "class_names" not in arrays


def test_training_grids_of_a_class_conditional_model_have_a_labelled_row_per_class(tmp_path):
    from difflab.tasks.train import train

    overrides = [*TINY, "model=cfg", "trainer.max_steps=3", "trainer.limit_train_batches=2"]  # validates at step 2
    overrides += [
        "samples.num_samples=20",
        "callbacks.sample_grid.num_samples=20",
        "callbacks.sample_grid.every_n_epochs=1",
    ]
    train(compose_config(overrides, tmp_path))
    final = tmp_path / "samples" / "samples.png"
    epoch = next((tmp_path / "samples").glob("epoch*.png"))  # the per-epoch grid of SampleGridCallback
    saved = np.load(tmp_path / "samples" / "samples.npz")
    assert saved["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    plain_h, plain_w = image_grid(torch.zeros(20, saved["arr_0"].shape[-1], *saved["arr_0"].shape[1:3]), 2).shape[1:]
    scale = -(-512 // plain_w)  # enlarged to >= 512 px
    for path in (final, epoch):
        picture = np.asarray(Image.open(path).convert("L"))
        assert picture.shape[0] == plain_h * scale  # 10 rows of 2 (one per class) ...
        assert picture.shape[1] > plain_w * scale + 20  # ... with a left margin holding the class names
        assert (picture[:, : picture.shape[1] - plain_w * scale] < 128).any()


def test_grid_classes_rows_per_class_or_one_row():
    from difflab.utils.labels import grid_classes

    labels, nrow = grid_classes(10, 25)
    assert nrow == 2 and labels.tolist() == [c for c in range(10) for _ in range(2)]
    labels, nrow = grid_classes(10, 4)
    assert nrow == 4 and labels.tolist() == [0, 1, 2, 3]
    assert grid_classes(None, 8) == (None, None)

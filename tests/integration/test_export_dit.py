"""`python src/export.py format=diffusers` for a DiT: our DiT as diffusers' DiTTransformer2DModel (the same outputs,
conditional, unconditional, null class, learned variance), a folder whose diffusers loop (the one in its README)
samples as our DDIM does from the same noise, `net.time_freq_shift` (diffusers' timestep frequencies), and the
refusals (DiT's frequencies without approximate=true, cross-attention, widths diffusers fixes, latent models)."""

from __future__ import annotations

import functools
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from difflab.losses import DiffusionLoss
from difflab.modules import DiffusionModule, load_module
from difflab.networks import DiT
from difflab.networks.embeddings import timestep_embedding
from difflab.schedules import GaussianDiffusion
from difflab.tasks.export import export
from difflab.tasks.export_diffusers import export_diffusers
from difflab.tasks.export_dit import dit_transformer_config, dit_transformer_state_dict, to_diffusers
from difflab.tasks.train import train
from tests.conftest import CONF_DIR, TINY, cli_ok, compose_config, perturb_weights, run_cli

# its module-scoped checkpoints are trained once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_export_dit")

diffusers = pytest.importorskip("diffusers")

DIT = {"patch_size": 2, "hidden_size": 64, "depth": 2, "num_heads": 4}  # conf/net/dit_tiny.yaml
TINY_DIT = [o for o in TINY if not o.startswith("net")] + ["net=dit_tiny"]
RUN = ["trainer.max_steps=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=0", "samples.num_samples=0"]


def tolerance(reference: torch.Tensor) -> float:
    """float32 agreement of two orderings of the same sums: 64 ulps of the largest output (the two nets differ in
    summation order and rounding only: the permuted time-MLP columns, the float64-computed position table)."""
    return 64 * torch.finfo(torch.float32).eps * max(reference.abs().max().item(), 1.0)


def dit_module(shift: int = 1, num_classes: int | None = 3, **kwargs) -> DiffusionModule:
    """A DDPM (T = 1000) on 1x16x16 images with a perturbed dit_tiny (off its zero-initialised layers)."""
    torch.manual_seed(0)
    net = functools.partial(DiT, **DIT, time_freq_shift=shift)
    module = DiffusionModule(
        net=net,
        schedule=GaussianDiffusion(num_timesteps=1000),
        optimizer=torch.optim.Adam,
        image_shape=(1, 16, 16),
        num_classes=num_classes,
        **kwargs,
    )
    perturb_weights(module.net)
    return module.eval()


def test_time_freq_shift_zero_is_the_old_sinusoid_and_one_is_diffusers():
    t = torch.tensor([0, 1, 17, 500, 999])
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)  # the pre-option formula
    args = t.float()[:, None] * freqs[None]
    assert torch.equal(timestep_embedding(t, 256), torch.cat([args.sin(), args.cos()], dim=-1))  # bit-identical
    from diffusers.models.embeddings import get_timestep_embedding

    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=False, downscale_freq_shift=1)
    assert torch.equal(timestep_embedding(t, 256, freq_shift=1), theirs)


@pytest.mark.parametrize(
    ("num_classes", "variance"),
    [(3, "fixed_small"), (None, "fixed_small"), (3, "learned_range"), (None, "learned_range")],
    ids=["conditional", "unconditional", "conditional_learned_variance", "unconditional_learned_variance"],
)
def test_dit_maps_onto_dit_transformer_2d_model(num_classes, variance):
    loss = DiffusionLoss(loss_type="hybrid" if variance == "learned_range" else "simple")
    net = dit_module(num_classes=num_classes, variance_type=variance, loss=loss).net
    transformer = to_diffusers(net)  # load_state_dict(strict=True) inside: nothing left over, nothing missing
    assert transformer.config.out_channels == (2 if variance == "learned_range" else 1)
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 7, 500, 999])
    with torch.no_grad():
        if num_classes:  # classes 0, 1, 2 and the null class 3; and y=None, which is the null class
            y = torch.tensor([0, 1, 2, 3])
            pairs = [(net(x, t, y), transformer(x, t, class_labels=y).sample)]
            pairs.append((net(x, t, None), transformer(x, t, class_labels=torch.full((4,), 3)).sample))
            assert (pairs[0][0][0] - pairs[1][0][0]).abs().max() > 1e-3  # the class matters
        else:  # the one zero row
            pairs = [(net(x, t), transformer(x, t, class_labels=torch.zeros(4, dtype=torch.long)).sample)]
    for ours, theirs in pairs:
        assert ours.abs().max() > 0.1
        torch.testing.assert_close(theirs, ours, atol=tolerance(ours), rtol=0)
        print(f"max |Δ| = {(theirs - ours).abs().max().item():.2e} (outputs up to {ours.abs().max().item():.2f})")


def test_every_block_gets_a_copy_of_the_condition_embedding():
    net = dit_module().net
    weights = dit_transformer_state_dict(net)
    for i in range(DIT["depth"]):
        table = weights[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"]
        assert torch.equal(table, net.embed.class_table.weight)
    w = weights["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"]
    assert torch.equal(w[:, :128], net.embed.time_mlp[0].weight[:, 128:])  # [cos | sin] columns


def test_what_does_not_map_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"cross-attention \(net.context_dim=8.*format=safetensors"):
        dit_transformer_config(DiT(1, 1, 16, **DIT, context_dim=8))
    with pytest.raises(ValueError, match="net.frequency_size=32.*256"):
        dit_transformer_config(DiT(1, 1, 16, **DIT, frequency_size=32))
    with pytest.raises(ValueError, match="net.mlp_ratio=2.*4x wide"):
        dit_transformer_config(DiT(1, 1, 16, **DIT, mlp_ratio=2.0))
    with pytest.raises(ValueError, match="net.time_freq_shift=2"):
        DiT(1, 1, 16, **DIT, time_freq_shift=2)
    latent = SimpleNamespace(diffusion=SimpleNamespace(), autoencoder=object(), net=None)
    with pytest.raises(ValueError, match="latent diffusion model.*AutoencoderKL"):
        export_diffusers(latent, {}, tmp_path / "latent")
    assert not (tmp_path / "latent").exists()
    with pytest.raises(ValueError, match="rectified flow.*format=safetensors"):
        export_diffusers(SimpleNamespace(diffusion=SimpleNamespace(process_kind="flow")), {}, tmp_path / "flow")


def test_dit_frequencies_are_refused_unless_approximate(tmp_path, caplog):
    """net.time_freq_shift=0 (DiT's): no weight absorbs diffusers' other frequencies, so export refuses, saying why
    and what to do; approximate=true exports, logging (and writing in the README) the measured difference."""
    module = dit_module(shift=0)
    with pytest.raises(ValueError, match="net.time_freq_shift=0.*no weight can absorb.*approximate=true"):
        export_diffusers(module, {}, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with caplog.at_level(logging.WARNING):
        export_diffusers(module, {}, tmp_path / "approx", approximate=True)
    assert "differs from ours by up to" in caplog.text
    readme = (tmp_path / "approx" / "README.md").read_text()
    assert "Approximate export" in readme
    print(next(line for line in caplog.text.splitlines() if "differs" in line))


@pytest.fixture(scope="module")
def dit_checkpoint(tmp_path_factory):
    """A tiny class-conditional DiT (model=cfg, w = 1) with diffusers' timestep frequencies, trained 2 steps."""
    out = tmp_path_factory.mktemp("dit_cfg")
    overrides = [*TINY_DIT, "net.time_freq_shift=1", "model=cfg", *RUN]
    return train(compose_config(overrides, out))["checkpoint"]


def _ddim(checkpoint, steps: int):
    config = OmegaConf.load(CONF_DIR / "sampler" / "ddim.yaml")
    config.steps = steps
    module, record = load_module(checkpoint, sampler=config)
    perturb_weights(module.net)  # 2 training steps leave the output layer near 0: make the classes matter
    return module, record


def test_export_py_writes_the_transformer_and_scheduler(dit_checkpoint, tmp_path):
    folder = tmp_path / "dit"
    proc = cli_ok(run_cli("export.py", f"ckpt={dit_checkpoint}", "format=diffusers", f"out={folder}", cwd=tmp_path))
    assert "DiTPipeline cannot drive a pixel-space DiT" in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit"]  # only `out` is written
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "scheduler", "transformer"]  # no model_index
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    module, _ = load_module(dit_checkpoint)
    assert transformer.config.num_embeds_ada_norm == module.num_classes == 10
    assert scheduler.config.num_train_timesteps == module.diffusion.num_timesteps
    for name, value in dit_transformer_state_dict(module.net).items():
        assert torch.equal(transformer.state_dict()[name], value), name


def _diffusers_ddim(folder, y: torch.Tensor, w: float, steps: int, alphas_cumprod=None) -> torch.Tensor:
    """The plain diffusers loop: DDIM η = 0, CFG with s = 1 + w and the null class, from seed 0's noise."""
    transformer = diffusers.DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    if alphas_cumprod is not None:  # our float64 ᾱ (diffusers recomputes it from β in float32)
        scheduler.alphas_cumprod = alphas_cumprod
    scheduler.set_timesteps(steps)
    null, n = torch.full_like(y, transformer.config.num_embeds_ada_norm), len(y)
    x = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = transformer(torch.cat([x, x]), t.expand(2 * n), class_labels=torch.cat([y, null])).sample
            cond, uncond = out.chunk(2)
            eps = uncond + (1 + w) * (cond - uncond)
            x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x.clamp(-1, 1)


def test_a_diffusers_loop_on_the_export_samples_as_our_ddim(dit_checkpoint, tmp_path):
    """Same initial noise, DDIM η = 0 on the same 10 trailing steps, CFG w = 1 (s = 2), the null class 10."""
    module, record = _ddim(dit_checkpoint, 10)
    export_diffusers(module, record, tmp_path / "dit")
    y = torch.tensor([0, 3, 7, 9])
    ours = module.sample(4, generator=torch.Generator().manual_seed(0), y=y, guidance_scale=1.0)
    assert ours.std() > 0.1
    theirs = _diffusers_ddim(tmp_path / "dit", y, 1.0, 10, module.diffusion.alphas_cumprod_64)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    print(f"DDIM 10 steps, w = 1, our ᾱ: max |Δ| = {(theirs - ours).abs().max().item():.2e}")
    as_exported = _diffusers_ddim(tmp_path / "dit", y, 1.0, 10)
    torch.testing.assert_close(as_exported, ours, atol=1e-4, rtol=0)
    print(f"as exported (float32 ᾱ): max |Δ| = {(as_exported - ours).abs().max().item():.2e}")


def test_the_folder_readme_loop_runs_and_draws_our_samples(dit_checkpoint, tmp_path):
    module, record = _ddim(dit_checkpoint, min(50, 20))  # the README's steps: min(50, T) with T = 20
    export_diffusers(module, record, tmp_path / "dit")
    readme = (tmp_path / "dit" / "README.md").read_text()
    assert "DiTPipeline" in readme and "`guidance_scale` s = 1 + w" in " ".join(readme.split())
    code = readme.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, str(tmp_path / "dit" / "README.md"), "exec"), namespace)  # the README's loop, as written
    y = namespace["y"]
    ours = module.sample(len(y), generator=torch.Generator().manual_seed(0), y=y, guidance_scale=1.0)
    assert namespace["s"] == 1 + module.guidance_scale == 2.0
    torch.testing.assert_close(namespace["images"], (ours + 1) / 2, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def dit_shift0_checkpoint(tmp_path_factory):
    """A tiny unconditional learned-variance DiT (model=iddpm) with DiT's frequencies (the default), 2 steps."""
    out = tmp_path_factory.mktemp("dit_iddpm")
    return train(compose_config([*TINY_DIT, "model=iddpm", *RUN], out))["checkpoint"]


def test_export_refuses_dit_frequencies_unless_approximate(dit_shift0_checkpoint, tmp_path):
    config = [f"ckpt={dit_shift0_checkpoint}", "format=diffusers", f"out={tmp_path / 'dit'}"]
    with pytest.raises(ValueError, match="net.time_freq_shift=0"):
        export(compose_config(config, tmp_path, "export"))
    export(compose_config([*config, "approximate=true"], tmp_path, "export"))
    readme = (tmp_path / "dit" / "README.md").read_text()
    assert "Approximate export" in readme and "2 x 1 output channels" in readme
    code = readme.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the unconditional loop runs
    assert namespace["images"].shape == (4, 1, 16, 16) and torch.isfinite(namespace["images"]).all()

"""Stage-1 autoencoder parts: shapes per factor f, KL and VQ regularisers, GAN loss pieces, perceptual distances."""

from __future__ import annotations

import pytest
import torch

from difflab.losses import AutoencoderLoss, adaptive_weight, hinge_d_loss
from difflab.losses.perceptual import build_perceptual
from difflab.networks import Autoencoder, PatchDiscriminator
from difflab.networks.regularizers import DiagonalGaussian, VectorQuantizer

SMALL = dict(ch=8, num_res_blocks=1, num_groups=4, embed_dim=3, z_channels=4)


@pytest.mark.parametrize("ch_mult, f", [((1, 2), 2), ((1, 2, 2), 4), ((1, 1, 2, 2), 8)])
@pytest.mark.parametrize("regularizer", ["kl", "vq"])
def test_encoder_decoder_shapes_for_each_factor(ch_mult, f, regularizer):
    ae = Autoencoder(1, 32, regularizer, ch_mult=ch_mult, n_embed=16, **SMALL)
    x = torch.randn(2, 1, 32, 32)
    z = ae.encode(x)
    assert ae.downsample_factor == f and z.shape == (2, 3, 32 // f, 32 // f) == (2, *ae.latent_shape)
    assert ae.decode(z).shape == x.shape
    x_hat, reg, info = ae(x)
    assert x_hat.shape == x.shape and torch.isfinite(reg).all()
    assert ("perplexity" in info) == (regularizer == "vq")


def test_autoencoder_rejects_bad_config():
    with pytest.raises(ValueError, match="autoencoder.regularizer"):
        Autoencoder(1, 32, "gaussian")
    with pytest.raises(ValueError, match="not divisible"):
        Autoencoder(1, 30, "kl", ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="ch_mult"):
        Autoencoder(1, 32, "kl", ch_mult=(1,))


def test_kl_of_a_standard_normal_posterior_is_zero():
    posterior = DiagonalGaussian(torch.zeros(3, 8, 4, 4))  # μ = 0, log σ² = 0
    assert torch.equal(posterior.kl(), torch.zeros(3))


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(2, 6, 3, 3)
    posterior = DiagonalGaussian(moments)
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    p = torch.distributions.Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)
    samples = torch.stack([posterior.sample() for _ in range(2000)])
    assert ((samples.mean(0) - posterior.mean).abs() < 5 * posterior.std / 2000**0.5).all()  # 5 standard errors
    torch.testing.assert_close(samples.std(0), posterior.std, rtol=0.1, atol=0)


def test_vq_returns_codebook_entries_and_passes_gradients_straight_through():
    vq = VectorQuantizer(n_embed=8, embed_dim=3, beta=0.25)
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, loss, info = vq(z_e)
    codes = vq.codebook.weight.detach()
    vectors = z_q.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(vectors, codes[info["indices"].flatten()])  # forward value: codebook rows
    nearest = torch.cdist(z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3), codes).argmin(1)
    assert torch.equal(info["indices"].flatten(), nearest)
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    torch.testing.assert_close(z_e.grad, upstream)  # straight-through: ∂z_q/∂z_e = I
    expected = (1 + 0.25) * torch.mean((z_q.detach() - z_e.detach()) ** 2)  # codebook + β commitment
    torch.testing.assert_close(loss.detach(), expected)


def test_vq_codebook_and_encoder_get_their_own_loss_gradients():
    vq = VectorQuantizer(n_embed=4, embed_dim=2, beta=0.5)
    z_e = torch.randn(1, 2, 2, 2, requires_grad=True)
    _, loss, _ = vq(z_e)
    loss.backward()
    assert vq.codebook.weight.grad.abs().sum() > 0 and z_e.grad.abs().sum() > 0


def test_vq_perplexity_counts_codes_used():
    vq = VectorQuantizer(n_embed=4, embed_dim=2, data_init=False)
    with torch.no_grad():
        vq.codebook.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    z_e = vq.codebook.weight.detach().t().reshape(1, 2, 2, 2)  # each code exactly once
    _, _, info = vq(z_e)
    torch.testing.assert_close(info["perplexity"], torch.tensor(4.0))
    assert info["usage"] == 1.0
    _, _, info = vq(torch.zeros(1, 2, 2, 2))  # one code for everything
    torch.testing.assert_close(info["perplexity"], torch.tensor(1.0))
    assert info["usage"] == 0.25


def test_hinge_loss_reference_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 − real) = [0, 0.5] → mean 0.25; relu(1 + fake) = [0, 1] → mean 0.5; ½ (0.25 + 0.5)
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.375))


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    rec, g = (3 * w).sum(), (w**2).sum()  # ∇rec = [3, 3], ∇g = [2, 4]
    expected = torch.tensor(18.0).sqrt() / (torch.tensor(20.0).sqrt() + 1e-4)
    torch.testing.assert_close(adaptive_weight(rec, g, w), expected)


def test_adaptive_weight_is_finite_with_a_zero_generator_gradient():
    w = torch.nn.Parameter(torch.ones(3))
    weight = adaptive_weight((w * 2).sum(), (w * 0).sum(), w)
    assert torch.isfinite(weight) and weight == 1e4  # clamped


def test_generator_loss_turns_gan_on_at_disc_start():
    ae = Autoencoder(1, 16, "kl", ch_mult=(1, 2), **SMALL)
    disc = PatchDiscriminator(1, ch=8, n_layers=1, num_groups=4)
    loss_fn = AutoencoderLoss(perceptual="none", disc_start=10)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    x_hat, kl, _ = ae(x)
    before, logs = loss_fn.generator_loss(x, x_hat, kl, disc(x_hat), ae.last_layer, step=9, kl=True)
    assert "g_loss" not in logs
    after, logs = loss_fn.generator_loss(x, x_hat, kl, disc(x_hat), ae.last_layer, step=10, kl=True)
    assert "g_loss" in logs and torch.isfinite(logs["d_weight"])
    expected_rec = (x - x_hat).abs().mean() + 1e-6 * kl.mean() / x[0].numel()
    torch.testing.assert_close(before, expected_rec)


def test_perceptual_alternatives_are_named_and_lpips_is_never_untrained(tmp_path, monkeypatch):
    assert build_perceptual("none") is None
    net = build_perceptual("fmnist_cls")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert torch.allclose(net(x, x), torch.zeros(2), atol=1e-6)
    assert (net(x, x.flip(-1)) > 0).all()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="backbone"):
        build_perceptual("lpips")
    with pytest.raises(ValueError, match="perceptual"):
        build_perceptual("vgg_untrained")


def test_patch_discriminator_scores_patches():
    disc = PatchDiscriminator(3, ch=8, n_layers=2, num_groups=4)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)


def test_vq_codebook_starts_from_encoder_outputs_once_and_not_after_loading():
    vq = VectorQuantizer(n_embed=8, embed_dim=2)
    z_e = torch.randn(4, 2, 4, 4) * 5 + 3  # far from the uniform(±1/8) init
    _, _, info = vq(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 2)
    assert torch.cdist(vq.codebook.weight.detach(), flat).min(dim=1).values.max() < 0.01  # codes are data points
    assert info["usage"] > 0.5 and not vq.needs_init
    before = vq.codebook.weight.detach().clone()
    vq(z_e * 2)
    assert torch.equal(vq.codebook.weight.detach(), before)  # only the first batch
    fresh = VectorQuantizer(n_embed=8, embed_dim=2)
    fresh.load_state_dict(vq.state_dict())
    assert not fresh.needs_init
    fresh(z_e * 2)
    assert torch.equal(fresh.codebook.weight.detach(), before)

"""Classifier-free guidance and thresholding."""

import pytest
import torch

from difflab.networks import UNet
from difflab.samplers.guidance import classifier_free_guidance
from difflab.samplers.thresholding import dynamic_threshold


def mocked_net(x, t, y):
    """ε_θ = label-dependent constant: 1 for the null class (index 10), y/10 otherwise."""
    value = torch.where(y == 10, torch.ones_like(y, dtype=torch.float32), y.float() / 10)
    return value.reshape(-1, 1, 1, 1).expand_as(x)


def test_guided_eps_equals_the_formula():
    x, t, y = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 4, 9])
    for w in (0.0, 0.5, 3.0):
        guided = classifier_free_guidance(mocked_net, y, null_label=10, guidance_scale=w)(x, t)
        expected = (1 + w) * (y.float() / 10) - w * 1.0
        torch.testing.assert_close(guided[:, 0, 0, 0], expected)


def test_w_zero_is_conditional_sampling():
    net = UNet(
        1, 1, 8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), num_classes=5
    )
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 5, 9, 3]), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(classifier_free_guidance(net, y, 5, 0.0)(x, t), net(x, t, y))


def test_batched_2b_forward_equals_two_forwards():
    torch.manual_seed(0)
    net = UNet(
        1,
        2,
        8,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_classes=5,
        num_groups=4,
    ).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 5, 9]), torch.tensor([0, 2, 4])
    w = 2.0
    guided = classifier_free_guidance(net, y, 5, w, mean_channels=1)(x, t)
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 5))
    torch.testing.assert_close(guided[:, :1], (1 + w) * cond[:, :1] - w * uncond[:, :1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[:, 1:], cond[:, 1:], rtol=1e-5, atol=1e-5)  # variance: the conditional one


def test_negative_guidance_is_refused():
    with pytest.raises(ValueError, match="guidance_scale"):
        classifier_free_guidance(mocked_net, torch.zeros(1, dtype=torch.long), 10, -1.0)


def test_dynamic_threshold_reference():
    x0 = torch.tensor([[0.5, -0.2, 0.1, 0.3], [2.0, -4.0, 1.0, 0.5]])
    out = dynamic_threshold(x0, percentile=1.0)
    torch.testing.assert_close(out[0], x0[0])  # max |x| < 1: s = 1, unchanged
    torch.testing.assert_close(out[1], torch.tensor([0.5, -1.0, 0.25, 0.125]))  # s = 4: clip to [-4, 4], / 4
    # percentile 0.5 of |x| = [2, 4, 1, 0.5] is 1.5 (linear interpolation): clip to ±1.5 then / 1.5
    half = dynamic_threshold(x0[1:], percentile=0.5)
    torch.testing.assert_close(half[0], torch.tensor([1.0, -1.0, 1.0 / 1.5, 0.5 / 1.5]))
    assert dynamic_threshold(torch.rand(2, 3, 4, 4) * 2 - 1).abs().max() <= 1.0

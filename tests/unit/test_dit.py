"""The DiT's adaLN-Zero start (exact zero output, identity blocks), that it learns from there, masking of padded
context tokens, and the construction-time errors."""

from __future__ import annotations

import pytest
import torch

from difflab.networks import DiT


def tiny(**kwargs) -> DiT:
    torch.manual_seed(0)
    return DiT(**{"hidden_size": 32, "depth": 2, "num_heads": 4, "frequency_size": 32, **kwargs})


SHAPES = {  # (in_channels, out_channels, image_size, patch_size)
    "pixels_32x32x1": (1, 1, 32, 2),
    "pixels_learned_sigma": (1, 2, 32, 4),
    "latents_8x8x3": (3, 3, 8, 2),
    "latents_learned_sigma": (3, 6, 8, 1),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("condition", ["none", "classes", "context"])
def test_fresh_dit_outputs_exactly_zero_and_every_block_is_the_identity(shape, condition):
    c_in, c_out, size, patch = shape
    extra = {"classes": {"num_classes": 10}, "context": {"context_dim": 16}}.get(condition, {})
    net = tiny(in_channels=c_in, out_channels=c_out, image_size=size, patch_size=patch, **extra)
    x, t = torch.randn(3, c_in, size, size), torch.tensor([0, 500, 999])
    y = torch.tensor([0, 9, 3]) if condition == "classes" else None
    context = torch.randn(3, 5, 16) if condition == "context" else None
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0], out))) for b in net.blocks]
    out = net(x, t, y, context, None if context is None else torch.ones(3, 5, dtype=torch.bool))
    for hook in hooks:
        hook.remove()
    assert out.shape == (3, c_out, size, size) and torch.equal(out, torch.zeros_like(out))
    assert len(seen) == 2 and all(torch.equal(block_in, block_out) for block_in, block_out in seen)


def test_it_learns_from_the_zero_start():
    """At the start only the final layer gets gradients (adaLN-Zero: every gate is 0); after a few steps all do,
    and the loss of fitting one batch falls."""
    net = tiny(in_channels=1, out_channels=1, image_size=8, num_classes=3)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        opt.zero_grad()
        loss = (net(x, t, y) - x).square().mean()
        loss.backward()
        if step == 0:
            with_grad = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            assert with_grad and all(n.startswith("final_layer") for n in with_grad), with_grad
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_padded_context_tokens_are_ignored():
    net = tiny(in_channels=3, out_channels=3, image_size=8, context_dim=16)
    with torch.no_grad():
        for p in net.parameters():  # away from the zero init
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 50])
    context, mask = torch.randn(2, 6, 16), torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    changed = context.clone()
    changed[0, 3:] = 100.0  # padding of the first row
    torch.testing.assert_close(
        net(x, t, context=changed, context_mask=mask), net(x, t, context=context, context_mask=mask)
    )
    changed[0, 0] = 100.0  # a real token
    assert not torch.allclose(
        net(x, t, context=changed, context_mask=mask)[0], net(x, t, context=context, context_mask=mask)[0]
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(image_size=16, patch_size=3), r"net.patch_size=3: must divide the image size \(16\)"),
        (dict(hidden_size=30, num_heads=4), "net.hidden_size=30: must be a multiple of net.num_heads=4"),
        (dict(hidden_size=6, num_heads=3), "net.hidden_size=6: must be a multiple of net.num_heads=3 and of 4"),
        (dict(depth=0), "net.depth=0"),
    ],
)
def test_bad_shapes_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny(**{"in_channels": 1, "out_channels": 1, "image_size": 8, **kwargs})


def test_wrong_calls_say_what_is_missing():
    net = tiny(in_channels=1, out_channels=1, image_size=8, context_dim=4)
    with pytest.raises(ValueError, match="needs a context"):
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"DiT built for 8x8 inputs, got \(16, 16\)"):
        net(torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long), context=torch.zeros(1, 2, 4))

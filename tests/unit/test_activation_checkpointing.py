"""net.checkpointing=true: the same outputs and gradients, with activations recomputed in the backward pass; the
FSDP units each network exposes."""

from __future__ import annotations

import pytest
import torch

from difflab.strategies.fsdp import FSDPStrategy
from tests.conftest import TINY_NETS


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_checkpointing_gives_the_same_outputs_and_gradients(kind):
    torch.manual_seed(0)
    plain = TINY_NETS[kind](in_channels=1, out_channels=1, image_size=8)
    checkpointed = TINY_NETS[kind](in_channels=1, out_channels=1, image_size=8, checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    for p in plain.parameters():  # DiT's zero-initialised output would give zero gradients to everything else
        torch.nn.init.normal_(p, std=0.1)
    checkpointed.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    grads = []
    for net in (plain, checkpointed):
        net.zero_grad()
        out = net(x, t)
        out.square().mean().backward()
        grads.append((out.detach(), [p.grad.clone() for p in net.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # sampling: no recomputation, the plain forward
        torch.testing.assert_close(checkpointed(x, t), plain(x, t), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_shard_units_cover_the_blocks(kind):
    net = TINY_NETS[kind](in_channels=1, out_channels=1, image_size=8)
    units = net.shard_units()
    in_units = sum(p.numel() for unit in units for p in unit.parameters())
    assert units and 0.5 < in_units / sum(p.numel() for p in net.parameters()) < 1.0  # blocks; embeddings outside


def test_fsdp_strategy_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match=r"trainer.strategy.param_dtype='fp8': expected one of"):
        FSDPStrategy(param_dtype="fp8")

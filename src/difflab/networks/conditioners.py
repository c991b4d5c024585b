"""Conditioners of latent diffusion: map a condition to the context (B, L, context_dim) that the UNet cross-attends to.

A conditioner works on a *condition tensor* ``cond``: class labels (B,) for ``class``, token ids (B, L) for the text
encoders. ``from_labels`` turns data labels into conditions (text: synthetic captions from templates over the class
names — real images, made-up captions), ``from_prompts`` tokenizes user prompts, ``null`` gives the unconditional
condition of classifier-free guidance (the null class, or the empty caption), ``drop`` replaces rows by it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

TEMPLATES = (
    "a photo of {a} {name}",
    "a black and white picture of {a} {name}",
    "a picture of {a} {name}",
    "an image of {a} {name}",
    "a grayscale photo of the {name}",
    "a small photo of {a} {name}",
)


def caption(name: str, template: str) -> str:
    """Fill a template with a class name and its indefinite article."""
    return template.format(a="an" if name[:1].lower() in "aeiou" else "a", name=name)


class Conditioner(nn.Module):
    """Base class. Subclasses set ``context_dim`` and implement ``forward(cond) → (context, mask or None)``."""

    context_dim: int

    def __init__(self, class_names: Sequence[str] | None = None, templates: Sequence[str] = TEMPLATES) -> None:
        super().__init__()
        self.class_names = list(class_names or [])
        self.templates = list(templates)
        if not self.templates:
            raise ValueError("conditioner.templates: expected at least one caption template")

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) or None

    @property
    def accepts_prompts(self) -> bool:
        return False

    def captions(self, y: torch.Tensor, generator: torch.Generator | None = None) -> list[str]:
        """A caption per label y (B,): a random template per row with ``generator``, else the first template."""
        if not self.class_names:
            raise ValueError("conditioner.class_names is empty: captions need the data set's class names")
        if generator is None:
            picks = [0] * y.numel()
        else:
            picks = torch.randint(len(self.templates), (y.numel(),), generator=generator).tolist()
        return [caption(self.class_names[int(c)], self.templates[i]) for c, i in zip(y.tolist(), picks, strict=True)]

    def from_labels(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.from_prompts(self.captions(y, generator)).to(y.device)

    def from_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} takes class labels, not text prompts")

    def null(self, batch: int, device: torch.device | str) -> torch.Tensor:
        """The empty caption for ``batch`` rows (tokenized once, expanded: every step's ``drop`` calls this)."""
        return self.from_prompts([""]).to(device).expand(batch, -1)

    def drop(self, cond: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace the rows of ``cond`` where ``mask`` (B,) bool is True by the null condition."""
        null = self.null(cond.shape[0], cond.device)
        return torch.where(mask.view(-1, *([1] * (cond.dim() - 1))), null, cond)


class ClassConditioner(Conditioner):
    """Class embedding table as a length-1 context: y (B,) → (B, 1, context_dim); index ``num_classes`` is null."""

    def __init__(self, num_classes: int, context_dim: int = 64, class_names: Sequence[str] | None = None) -> None:
        super().__init__(class_names)
        if num_classes < 1:
            raise ValueError(f"conditioner.num_classes={num_classes}: expected >= 1")
        self.count, self.context_dim = num_classes, context_dim
        self.embedding = nn.Embedding(num_classes + 1, context_dim)

    @property
    def num_classes(self) -> int:
        return self.count

    def from_labels(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return y.long()

    def null(self, batch: int, device: torch.device | str) -> torch.Tensor:
        return torch.full((batch,), self.count, dtype=torch.long, device=device)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.embedding(cond)[:, None, :], None


class ByteTokenizer:
    """UTF-8 bytes as tokens (offline, any prompt): ids = byte + 3, with PAD = 0, BOS = 1, EOS = 2."""

    PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
    vocab_size = 256 + OFFSET

    def __init__(self, max_length: int = 64) -> None:
        if max_length < 3:
            raise ValueError(f"conditioner.max_length={max_length}: expected >= 3")
        self.max_length = max_length

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, max_length) long ids: BOS, bytes (truncated), EOS, PAD…"""
        ids = torch.full((len(texts), self.max_length), self.PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            body = [b + self.OFFSET for b in text.lower().encode("utf-8")][: self.max_length - 2]
            tokens = [self.BOS, *body, self.EOS]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


class TextTransformerConditioner(Conditioner):
    """A small transformer encoder over byte tokens, trained jointly with the UNet (offline-friendly).

    ids (B, L) → context (B, L, context_dim), mask (B, L) True at real tokens (padding masked in attention).
    """

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        context_dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        max_length: int = 48,
        templates: Sequence[str] = TEMPLATES,
    ) -> None:
        super().__init__(class_names, templates)
        self.context_dim = context_dim
        self.tokenizer = ByteTokenizer(max_length)
        self.token_embedding = nn.Embedding(ByteTokenizer.vocab_size, context_dim)
        self.position_embedding = nn.Parameter(torch.randn(max_length, context_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            context_dim, num_heads, 4 * context_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(context_dim)

    @property
    def accepts_prompts(self) -> bool:
        return True

    def from_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(prompts).to(self.token_embedding.weight.device)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = cond != ByteTokenizer.PAD
        h = self.token_embedding(cond) + self.position_embedding[: cond.shape[1]]
        h = self.encoder(h, src_key_padding_mask=~mask)
        return self.norm(h), mask

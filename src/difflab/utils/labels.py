"""Grids that say what they show: a text margin with each row's (or column's) label, drawn with PIL.

A grid of N images in rows of ``nrow`` gets row labels when every row shows one label (``classes=all``: one class
per row), else column labels when every column does (prompts cycled over the samples; reconstruct's
original/reconstruction pairs). Narrow columns get their labels written vertically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from difflab.utils.images import image_grid
from difflab.utils.paths import atomic_write

PADDING = 2  # torchvision's make_grid padding used by image_grid
MAX_CHARS = 40


def grid_axes(tags: Sequence[str], nrow: int) -> tuple[list[str] | None, list[str] | None]:
    """(row labels, column labels) of ``tags`` (one per image) laid out ``nrow`` per row: rows when each row has
    one tag, else columns when each column has one, else (None, None)."""
    rows = [list(tags[i : i + nrow]) for i in range(0, len(tags), nrow)]
    if all(len(set(row)) == 1 for row in rows):
        return [row[0] for row in rows], None
    columns = [list(tags[j::nrow]) for j in range(min(nrow, len(tags)))]
    if all(len(set(column)) == 1 for column in columns):
        return None, [column[0] for column in columns]
    return None, None


def class_tags(labels: torch.Tensor, names: Sequence[str] | None) -> list[str]:
    """One tag per label: its class name, ``class i`` where there are no names."""
    return [names[i] if names and i < len(names) else f"class {i}" for i in labels.tolist()]


def class_names_of(data: object) -> list[str] | None:
    """The ``class_names`` of a data module or its class (None when it has none: e.g. an image folder's class, whose
    names are only known from its files once an instance has read them)."""
    names = getattr(data, "class_names", None)
    return [str(n) for n in names] if names else None


def class_rows(num_classes: int, num_samples: int) -> tuple[torch.Tensor, int]:
    """Labels for one row per class, ``max(1, num_samples // num_classes)`` images each, and that row length."""
    per_class = max(1, num_samples // num_classes)
    return torch.arange(num_classes).repeat_interleave(per_class), per_class


def grid_classes(num_classes: int | None, num_samples: int) -> tuple[torch.Tensor | None, int | None]:
    """Labels (n,) and row length of a training-time grid of a class-conditional model: :func:`class_rows` when
    there are samples for every class, else classes 0, 1, ... in one row; (None, None) for an unconditional model."""
    if not num_classes:
        return None, None
    if num_samples < num_classes:
        return torch.arange(num_samples), num_samples
    return class_rows(num_classes, num_samples)


def _short(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 1] + "…"


def label_grid(
    grid: Image.Image, cell: tuple[int, int], rows: list[str] | None, cols: list[str] | None, padding: int = PADDING
) -> Image.Image:
    """``grid`` (an image grid with cells of ``cell`` = (height, width) pixels plus ``padding``) with a white margin
    on the left holding ``rows`` and one on top holding ``cols``."""
    font = ImageFont.load_default()
    rows = [_short(r) for r in rows or []]
    cols = [_short(c) for c in cols or []]
    text_w = lambda s: int(font.getlength(s))  # noqa: E731
    text_h = 12
    step_y, step_x = cell[0] + padding, cell[1] + padding
    vertical = any(text_w(c) > step_x - 2 for c in cols)
    left = max((text_w(r) for r in rows), default=-6) + 6 if rows else 0
    top = (max(text_w(c) for c in cols) + 6 if vertical else text_h + 4) if cols else 0
    out = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    out.paste(grid.convert("RGB"), (left, top))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(rows):
        draw.text((2, top + padding + i * step_y + (cell[0] - text_h) // 2), text, fill="black", font=font)
    for j, text in enumerate(cols):
        x = left + padding + j * step_x
        if not vertical:
            draw.text((x + max(0, (cell[1] - text_w(text)) // 2), 2), text, fill="black", font=font)
            continue
        strip = Image.new("RGB", (text_w(text) + 2, text_h), "white")
        ImageDraw.Draw(strip).text((0, 0), text, fill="black", font=font)
        strip = strip.rotate(90, expand=True)
        out.paste(strip, (x + max(0, (cell[1] - strip.width) // 2), top - strip.height - 3))
    return out


def caption_tiles(
    grid: Image.Image, cell: tuple[int, int], nrow: int, tags: Sequence[str], padding: int = PADDING
) -> Image.Image:
    """``grid`` with a white band above each of its rows holding each tile's tag, cut to the tile's width: for tags
    that follow neither the rows nor the columns (``sample.py classes=[0,3,7]`` cycles them over the grid)."""
    font = ImageFont.load_default()
    band = 14
    step_y, step_x = cell[0] + padding, cell[1] + padding
    rows = -(-len(tags) // nrow)
    out = Image.new("RGB", (grid.width, grid.height + rows * band), "white")
    draw = ImageDraw.Draw(out)
    for r in range(rows):
        bottom = grid.height if r == rows - 1 else (r + 1) * step_y  # the grid's last padding stays with the last row
        strip = grid.crop((0, r * step_y, grid.width, bottom))
        out.paste(strip.convert("RGB"), (0, r * (step_y + band) + band))
        for j, text in enumerate(tags[r * nrow : (r + 1) * nrow]):
            while text and font.getlength(text) > cell[1]:
                text = text[:-1]
            x = padding + j * step_x + max(0, (cell[1] - int(font.getlength(text))) // 2)
            draw.text((x, r * (step_y + band) + 1), text, fill="black", font=font)
    return out


GRID_MIN_WIDTH = 512  # pixels: grids of small images are enlarged (nearest) to at least this width


def save_labelled_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int | None = None,
    tags: Sequence[str] | None = None,
    min_width: int = GRID_MIN_WIDTH,
) -> Path:
    """Write ``images`` (N, C, H, W) in [-1, 1] as one PNG grid of ``nrow`` per row, labelled from ``tags`` (one
    per image; see :func:`grid_axes`) when they line up with its rows or columns; returns the path. A grid narrower
    than ``min_width`` is enlarged by a whole factor with nearest-neighbour (64 samples at 16x16 make 146 px: too
    small to see), so every pixel stays a sharp square; the labels are drawn at their own size."""
    path = Path(path)
    grid = image_grid(images, nrow)
    nrow = nrow or max(1, math.isqrt(images.shape[0] - 1) + 1)  # image_grid's default
    scale = max(1, -(-min_width // grid.shape[-1]))
    array = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    rows, cols = grid_axes(list(tags), min(nrow, images.shape[0])) if tags else (None, None)
    cell = (images.shape[-2] * scale, images.shape[-1] * scale)
    if rows or cols:
        picture = label_grid(picture, cell, rows, cols, PADDING * scale)
    elif tags:  # neither rows nor columns share a tag: one caption per tile
        picture = caption_tiles(picture, cell, min(nrow, images.shape[0]), list(tags), PADDING * scale)
    with atomic_write(path) as file:
        picture.save(file, format="png")
    return path

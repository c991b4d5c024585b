"""``sample.py`` editing modes: inpainting (+ RePaint), image-to-image (SDEdit / DDIM inversion) and the cascade.

    python src/sample.py ckpt=... mode=inpaint image=shirt.png mask=[4,4,12,12] sampler=ddpm sampler.steps=250
    python src/sample.py ckpt=... mode=img2img image=shirt.png strength=0.6 sampler=ddim sampler.steps=50
    python src/sample.py ckpt=<text LDM> mode=img2img image=shirt.png prompt="a photo of a sneaker" guidance_scale=3
    python src/sample.py mode=cascade ckpt=<base 16x16> upscaler_ckpt=<upscaler 16→32>

Inputs are read with the image folder's loader (any PNG/JPEG/BMP/WebP, a file or a folder of them: shorter side
resized to the model's size, centre crop). Each input gets ``variants`` results; the grid shows per row the input
(inpaint: its mask and the masked input) and then the results; ``<mode>.npz`` holds the results as sample.py's npz.
Every mode takes ``classes`` (class-conditional models) or ``prompt`` (text-conditioned latent diffusion: one caption
or a list, cycled over the results) with ``guidance_scale``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig
from PIL import Image

from difflab.data.image_folder import IMAGE_EXTENSIONS, load_image
from difflab.data.transforms import to_unit_range
from difflab.modules import UpscalerModule, load_module
from difflab.samplers.ddim import DDIMSampler
from difflab.samplers.img2img import check_strength, img2img_loop
from difflab.samplers.inpaint import check_revisitable, inpaint_loop
from difflab.tasks.sample import class_labels, prompt_list
from difflab.utils.checkpoint_io import trusted_checkpoints
from difflab.utils.images import save_npz
from difflab.utils.labels import save_labelled_grid

log = logging.getLogger(__name__)

EDIT_MODES = ("inpaint", "img2img", "cascade")
BOX = re.compile(r"box:(\d+),(\d+),(\d+),(\d+)")


def image_paths(image: Any) -> list[Path]:
    """``image``: a file or a folder (its image files, sorted, recursively)."""
    if not image:
        raise ValueError("image=...: give an input image file (PNG/JPEG/...) or a folder of them")
    path = Path(str(image))
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise ValueError(f"image={path}: the folder holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return paths
    if not path.is_file():
        raise FileNotFoundError(f"image={path}: no such file or folder")
    return [path]


def read_images(paths: list[Path], shape: tuple[int, ...]) -> torch.Tensor:
    """(N, C, S, S) in [-1, 1]: each file converted to C channels, resized (shorter side) and centre-cropped to S."""
    channels, size = shape[0], shape[-1]
    images = []
    for path in paths:
        with Image.open(path) as raw:
            width, height = raw.size
        if (width, height) != (size, size):
            log.info(
                "image %s: %dx%d → %dx%d (shorter side resized, centre crop) for the model",
                path,
                width,
                height,
                size,
                size,
            )
        images.append(to_unit_range(load_image(path, channels, size)))
    return torch.stack(images)


def read_mask(mask: Any, image: Path, size: int) -> torch.Tensor:
    """The region to fill as (1, 1, S, S) {0, 1}: a box ``[x0,y0,x1,y1]`` (or the string ``box:x0,y0,x1,y1``;
    pixels [x0, x1) × [y0, y1) of the model's S x S image), ``center`` (the central half), or a PNG of the input
    image's size (white = fill)."""
    hole = torch.zeros(1, 1, size, size)
    if isinstance(mask, (list, tuple, ListConfig)):  # mask=[x0,y0,x1,y1]
        mask = "box:" + ",".join(str(v) for v in mask)
    spec = str(mask) if mask is not None else ""
    if spec == "center":
        lo, hi = size // 4, size - size // 4
        hole[..., lo:hi, lo:hi] = 1
        return hole
    if spec.startswith("box:"):
        match = BOX.fullmatch(spec)
        coords = [int(v) for v in match.groups()] if match else None
        if coords is None or not (0 <= coords[0] < coords[2] <= size and 0 <= coords[1] < coords[3] <= size):
            raise ValueError(
                f"mask={spec}: expected box:x0,y0,x1,y1 with 0 <= x0 < x1 <= {size}, 0 <= y0 < y1 <= {size}"
            )
        x0, y0, x1, y1 = coords
        hole[..., y0:y1, x0:x1] = 1
        return hole
    if not spec:
        raise ValueError("mode=inpaint needs mask=[x0,y0,x1,y1] | center | a mask PNG (white = the region to fill)")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"mask={path}: no such file (or use mask=[x0,y0,x1,y1] | center)")
    with Image.open(path) as raw, Image.open(image) as ref:
        if raw.size != ref.size:
            raise ValueError(
                f"mask={path}: {raw.size[0]}x{raw.size[1]}, but image={image} is {ref.size[0]}x{ref.size[1]}"
            )
    return (load_image(path, 1, size) >= 128).float().unsqueeze(0)


def latent_mask(known: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A known-pixel mask (B, 1, H, W) on the diffusion space's grid (B, 1, h, w): a latent cell is known only when its
    whole patch is (a min-pool), so nothing to be filled is overwritten by the reference."""
    if known.shape[-1] == shape[-1]:
        return known
    return -F.adaptive_max_pool2d(-known, shape[-2:])


def conditioning(
    cfg: DictConfig, module: Any, count: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str] | None, float | None]:
    """(the condition ``model_fn`` takes, labels, prompts, guidance weight) for ``count`` results: text ``prompt``
    (one or a list, cycled; text-conditioned latent diffusion) or ``classes`` (null: all in turn), checked as
    sample.py does."""
    scale = cfg.get("guidance_scale")
    if scale is not None and not module.conditional:
        raise ValueError(f"guidance_scale={scale}: this checkpoint's model is unconditional (it has no classes)")
    scale = module.guidance_scale if scale is None else float(scale)
    prompts = prompt_list(cfg.get("prompt"), count)
    if prompts is not None:
        return module.text_condition(prompts), None, prompts, scale
    labels, _ = class_labels(cfg.get("classes"), module.num_classes, count)
    return module.condition(None if labels is None else labels.to(device)), labels, None, scale


def prompt_arrays(prompts: list[str] | None) -> dict[str, np.ndarray] | None:
    """The npz's ``prompts`` array (one per result), as sample.py writes it."""
    return None if prompts is None else {"prompts": np.array(prompts)}


def deterministic_variants(cfg: DictConfig, sampler: Any, variants: int) -> int:
    """``start=invert`` with a deterministic sampler (DDIM, η = 0) maps each input to one result: its ``variants``
    would be copies of it (the "identical results" of issue 28, point 10), so one is drawn, with a warning."""
    deterministic = isinstance(sampler, DDIMSampler) and sampler.deterministic
    if str(cfg.get("start", "noise")) != "invert" or not deterministic or variants == 1:
        return variants
    log.warning(
        "variants=%d: start=invert with DDIM η = 0 gives every input one deterministic result; drawing 1 per input "
        "(sampler.eta > 0, or start=noise, gives different results)",
        variants,
    )
    return 1


def edit(cfg: DictConfig, module: Any, device: torch.device) -> dict[str, Any]:
    """Run ``cfg.mode`` (one of :data:`EDIT_MODES`) on the loaded ``module``; returns the paths written."""
    if cfg.mode == "cascade":
        return cascade(cfg, module, device)
    variants = int(cfg.get("variants", 1))
    if variants < 1:
        raise ValueError(f"variants={variants}: expected >= 1 results per input image")
    if cfg.mode == "img2img":
        check_strength(cfg.get("strength"))
        variants = deterministic_variants(cfg, module.sampler, variants)
    check_revisitable(module.sampler, cfg.mode)
    paths = image_paths(cfg.get("image"))
    images = read_images(paths, module.output_shape).to(device)
    x_ref = images.repeat_interleave(variants, dim=0)  # (N·variants, C, H, W): input i's results are a row
    cond, labels, prompts, scale = conditioning(cfg, module, x_ref.shape[0], device)
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    model_fn = module.model_fn(cond, scale)
    rows, headers = [images], ["input"]
    with torch.inference_mode(), module.sampling_precision():
        z_ref = module.from_images(x_ref)
        if cfg.mode == "inpaint":
            hole = read_mask(cfg.get("mask"), paths[0], images.shape[-1]).to(device)
            known = latent_mask(1 - hole, z_ref.shape)
            kwargs = {"jump_length": int(cfg.resample_jumps), "jump_n_sample": int(cfg.resample_times)}
            z = inpaint_loop(model_fn, module.sampler, z_ref, known, generator, **kwargs)
            rows += [hole.expand_as(images) * 2 - 1, images * (1 - hole)]
            headers += ["mask", "known"]
        else:
            z = img2img_loop(model_fn, module.sampler, z_ref, cfg.strength, cfg.get("start", "noise"), generator)
        results = module.to_images(z).clamp(-1, 1)
    per_input = results.reshape(images.shape[0], variants, *images.shape[1:])
    grid = torch.cat([torch.stack(rows, dim=1), per_input], dim=1)  # (N, len(rows) + variants, C, H, W)
    tags = [*headers, *(["result"] * variants)] * images.shape[0]  # a header per column
    out_dir = Path(cfg.out_dir)
    result = {
        "grid": save_labelled_grid(grid.flatten(0, 1), out_dir / f"{cfg.mode}.png", nrow=grid.shape[1], tags=tags),
        "npz": save_npz(results, out_dir / f"{cfg.mode}.npz", labels=labels, extra=prompt_arrays(prompts)),
        "nfe": module.sampler.nfe,
    }
    log.info("Wrote %s and %s (%d inputs x %d results)", result["grid"], result["npz"], images.shape[0], variants)
    return result


def load_upscaler(cfg: DictConfig, base: Any, device: torch.device) -> UpscalerModule:
    """``cfg.upscaler_ckpt`` with the command line's sampler, checked against the base model."""
    if isinstance(base, UpscalerModule):
        raise ValueError("mode=cascade: ckpt= is an upscaler; give the base model as ckpt= and this as upscaler_ckpt=")
    if not cfg.get("upscaler_ckpt"):
        raise ValueError(
            "mode=cascade needs upscaler_ckpt=<an upscaler checkpoint> (python src/train.py model=upscaler)"
        )
    with trusted_checkpoints(cfg.get("trust_checkpoint", False)):
        upscaler, _ = load_module(
            cfg.upscaler_ckpt, sampler=cfg.get("sampler"), map_location=device, key="upscaler_ckpt"
        )
    if not isinstance(upscaler, UpscalerModule):
        raise ValueError(f"upscaler_ckpt={cfg.upscaler_ckpt}: not an upscaler (trained with model=upscaler)")
    expected = (upscaler.image_shape[0], upscaler.low_res_size, upscaler.low_res_size)
    if tuple(base.output_shape) != expected:
        raise ValueError(
            f"mode=cascade: the base model makes {tuple(base.output_shape)} images, the upscaler takes {expected}"
        )
    upscaler.sample_batch_size = int(cfg.batch_size)
    return upscaler


def cascade(cfg: DictConfig, base: Any, device: torch.device) -> dict[str, Any]:
    """Base samples (classes or text prompts, guidance as generation) → the upscaler at ``aug_level``: a grid of
    pairs and npz."""
    upscaler = load_upscaler(cfg, base, device)
    num = int(cfg.num_samples)
    prompts = prompt_list(cfg.get("prompt"), num)
    labels = None
    if prompts is None:  # else a text-conditioned latent base (any other model refuses the prompts)
        labels, _ = class_labels(cfg.get("classes"), base.num_classes, num)
        num = num if labels is None else labels.numel()
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    low = base.sample(num, generator=generator, y=labels, guidance_scale=cfg.get("guidance_scale"), prompts=prompts)
    aug = cfg.get("aug_level")
    high = upscaler.upscale(low, generator, aug_level=None if aug is None else int(aug))
    size = high.shape[-1]
    pairs = torch.stack([F.interpolate(low, size=(size, size), mode="nearest"), high], dim=1).flatten(0, 1)
    out_dir = Path(cfg.out_dir)
    result = {
        "grid": save_labelled_grid(
            pairs, out_dir / "cascade.png", nrow=2 * max(1, int(num**0.5)), tags=["base (upsampled)", "upscaled"] * num
        ),
        "npz": save_npz(high, out_dir / "samples.npz", labels=labels, extra=prompt_arrays(prompts)),
        "base_npz": save_npz(low, out_dir / "base_samples.npz", labels=labels, extra=prompt_arrays(prompts)),
    }
    log.info(
        "Wrote %s and %s (%d samples, %s → %s)",
        result["grid"],
        result["npz"],
        num,
        tuple(low.shape[1:]),
        tuple(high.shape[1:]),
    )
    return result

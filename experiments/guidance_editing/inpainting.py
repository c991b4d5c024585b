"""Inpainting held-out Fashion-MNIST test images: masked-region PSNR / SSIM and FID, with and without RePaint.

    python experiments/guidance_editing/inpainting.py                       # the CPU run of RESULTS_inpainting.md
    python experiments/guidance_editing/inpainting.py --paper --tag cpu_paper      # RePaint's own 250/10/10
    python experiments/guidance_editing/inpainting.py --device cuda --num-images 10000 --batch-size 1000 --tag gpu \\
        --train "experiment=quickstart trainer=gpu trainer.max_steps=100000 model=ddpm schedule=cosine" \\
        --run-dir logs/guidance_editing/gpu/base16

The model is iddpm_nll's CPU model (the `make train` setup, 16x16, 1500 steps, cosine schedule; trained with
src/train.py unless its checkpoint exists). The first ``--num-images`` test images are inpainted under two masks:
``centre`` (the central half of each side: a quarter of the pixels) and ``random`` (2x2 blocks dropped with
probability 1/2, a fresh draw per image), with the DDPM ancestral sampler (RePaint's; fixed_small variance, static
clip) — plain replacement at 50 and 140 respaced steps, and RePaint's resampling at 50 steps (jump length j = 5,
r = 3 passes: 140 evaluations) — every cell from the same noise (batch b: generator seeded seed + b).
Metrics: PSNR over the filled pixels (data range 2), SSIM's map (torchmetrics, 11x11 Gaussian window) averaged over
the filled pixels, and FID of the inpainted images against ``--num-real`` test images on difflab's Fashion-MNIST
classifier features (fid_fmnist_cls: an offline proxy, NOT comparable to Inception FIDs); the FID of the unmasked
inputs themselves is the floor at this sample count.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.samplers import AncestralSampler  # noqa: E402
from difflab.samplers.inpaint import inpaint_loop  # noqa: E402
from difflab.utils.images import save_grid  # noqa: E402
from experiments.common import ROOT, ensure_checkpoint, hardware, load, markdown_table, real_metrics  # noqa: E402

OUT = Path(__file__).parent
SIMPLE = "experiment=quickstart trainer.max_steps=1500 model=ddpm schedule=cosine"  # iddpm_nll's CPU model
ROWS = [  # (name, steps, jump length j, passes r); RePaint at 50 steps costs 50 + 9·(r − 1)·j evaluations
    ("replacement, 50 steps", 50, 1, 1),
    ("replacement, 140 steps", 140, 1, 1),  # the NFE of the RePaint row
    ("RePaint j=5 r=3, 50 steps", 50, 5, 3),
]
PAPER_ROWS = [  # --paper: RePaint's own setting, 250 steps, j = 10, r = 10: 250 + 24·9·10 = 2,410 NFE
    ("replacement, 250 steps", 250, 1, 1),
    ("RePaint j=10 r=10, 250 steps (the paper's)", 250, 10, 10),
]
MASKS = ("centre", "random")


def holes(kind: str, num: int, size: int, seed: int) -> torch.Tensor:
    """(num, 1, size, size) {0, 1}, 1 = the region to fill."""
    hole = torch.zeros(num, 1, size, size)
    if kind == "centre":
        hole[..., size // 4 : size - size // 4, size // 4 : size - size // 4] = 1
        return hole
    blocks = torch.rand(num, 1, size // 2, size // 2, generator=torch.Generator().manual_seed(seed)) < 0.5
    return blocks.float().repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def inpaint_all(module, steps: int, j: int, r: int, x_ref, hole, args, device) -> tuple[torch.Tensor, int, float]:
    """Inpainted images (N, C, H, W), NFE per image, seconds."""
    sampler = module.build_sampler(
        functools.partial(AncestralSampler, steps=min(steps, module.diffusion.num_timesteps))
    )
    start, chunks = time.time(), []
    model_fn = module.model_fn(None)
    for b, i in enumerate(range(0, x_ref.shape[0], args.batch_size)):
        ref, known = x_ref[i : i + args.batch_size].to(device), 1 - hole[i : i + args.batch_size].to(device)
        g = torch.Generator(device=device).manual_seed(args.seed + b)
        with torch.inference_mode(), module.sampling_precision():
            chunks.append(inpaint_loop(model_fn, sampler, ref, known, g, None, j, r).clamp(-1, 1).cpu())
        nfe = sampler.nfe
    return torch.cat(chunks), nfe, time.time() - start


def region_metrics(images: torch.Tensor, x_ref: torch.Tensor, hole: torch.Tensor, gm) -> dict[str, float]:
    filled = hole.expand_as(images).bool()
    mse = (images - x_ref)[filled].pow(2).mean()
    _, ssim_map = structural_similarity_index_measure(
        images, x_ref, data_range=2.0, return_full_image=True, reduction="none"
    )
    gm.update_fake(images)
    values = gm.compute()
    return {
        "psnr_masked": float(10 * torch.log10(4.0 / mse)),
        "ssim_masked": float(ssim_map[filled].mean()),
        "known_exact": bool(torch.equal(images[~filled], x_ref[~filled])),
        **{k: float(v) for k, v in values.items() if k.startswith("fid")},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", default=SIMPLE, help="src/train.py overrides of the model")
    p.add_argument("--run-dir", default=str(ROOT / "logs" / "guidance_editing" / "cpu" / "base16"))
    p.add_argument("--num-images", type=int, default=100)
    p.add_argument("--num-real", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--rows", type=int, nargs="+", default=None, help="indices into ROWS (default: all)")
    p.add_argument("--paper", action="store_true", help="PAPER_ROWS (RePaint 250/10/10) instead of ROWS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default="cpu", help="results_inpainting_<tag>.json, inpainting_<tag>.png")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    module, record, test = load(ensure_checkpoint(Path(args.run_dir), args.train.split()), device)
    gm = real_metrics(test, args.num_real, ("fid",), "fmnist_cls", device, {"data": record["config"]["data"]})
    x_ref = torch.stack([test[i][0] for i in range(args.num_images)])
    gm.update_fake(x_ref)
    floor = {k: float(v) for k, v in gm.compute().items()}
    result: dict[str, Any] = {"hardware": hardware(), "args": vars(args), "global_step": record["global_step"]}
    result.update(fid_of_the_inputs=floor, rows=[])
    shown = [x_ref[:8]]
    for kind in MASKS:
        hole = holes(kind, args.num_images, x_ref.shape[-1], args.seed)
        shown.append(x_ref[:8] * (1 - hole[:8]) + hole[:8] * 0.0)
        table = PAPER_ROWS if args.paper else ROWS
        for index in args.rows if args.rows is not None else range(len(table)):
            name, steps, j, r = table[index]
            images, nfe, seconds = inpaint_all(module, steps, j, r, x_ref, hole, args, device)
            row = {"mask": kind, "method": name, "nfe": nfe, "seconds": round(seconds, 1)}
            row.update(region_metrics(images, x_ref, hole, gm))
            print(row, flush=True)
            result["rows"].append(row)
            shown.append(images[:8])
            (OUT / f"results_inpainting_{args.tag}.json").write_text(json.dumps(result, indent=2))
    # columns: 8 test images; rows: input, then per mask the masked input and each method's result
    save_grid(torch.cat(shown), OUT / f"inpainting_{args.tag}.png", nrow=8)
    keys = ["mask", "method", "nfe", "psnr_masked", "ssim_masked", "fid_fmnist_cls", "known_exact", "seconds"]
    print(markdown_table(keys, [[r.get(k) for k in keys] for r in result["rows"]]))
    print("FID of the inputs themselves:", floor)


if __name__ == "__main__":
    main()

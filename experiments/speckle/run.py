"""Speckled samples of young models (issue 28, point 10): which fraction of a checkpoint's samples is rougher than
almost every real image, per sampler, at two training lengths.

Roughness of an image: its mean absolute 4-neighbour Laplacian (pixels in [-1, 1]); a sample is *speckled* when it
is rougher than 99 % of the real Fashion-MNIST test images at the same 16x16 size. One JSON line per cell; the table
in ``experiments/speckle/results.json``.

    python experiments/speckle/run.py --ckpts logs/bench_quality/cpu/quickstart_s0/checkpoints/last.ckpt \
        logs/investigate/quickstart_3600/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.common import ROOT, write_json  # noqa: E402

SAMPLERS = {  # conf/sampler/<name> with overrides
    "ddpm 250 (ancestral)": ("ddpm", {"steps": 250}),
    "ddim 50": ("ddim", {"steps": 50}),
    "dpmpp_2m 20": ("dpmpp_2m", {"steps": 20}),
    "dpmpp_2m_sde 20": ("dpmpp_2m_sde", {"steps": 20}),
}


def roughness(x: torch.Tensor) -> torch.Tensor:
    """Mean |Laplacian| per image of x (N, C, H, W) in [-1, 1] (replicate padding): (N,)."""
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    centre = padded[..., 1:-1, 1:-1]
    laplacian = (
        padded[..., :-2, 1:-1] + padded[..., 2:, 1:-1] + padded[..., 1:-1, :-2] + padded[..., 1:-1, 2:] - 4 * centre
    )
    return laplacian.abs().flatten(1).mean(1)


def main(argv: list[str] | None = None) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from difflab.data import FashionMNISTDataModule
    from difflab.modules import load_module
    from difflab.utils.config import register_resolvers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpts", nargs="+", required=True)
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--out", type=Path, default=ROOT / "experiments" / "speckle" / "results.json")
    args = p.parse_args(argv)
    register_resolvers()
    torch.set_grad_enabled(False)
    test = FashionMNISTDataModule(str(ROOT / "data"), image_size=16, batch_size=500)
    test.setup("test")
    real = torch.stack([test.test[i][0] for i in range(5000)])
    threshold = float(roughness(real).quantile(0.99))
    rows = []
    for ckpt in args.ckpts:
        module, record = load_module(ckpt)
        for name, (conf, overrides) in SAMPLERS.items():
            config = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "sampler" / f"{conf}.yaml"), overrides)
            sampler = module.build_sampler(instantiate(config))
            images = module.sample(args.num_samples, torch.Generator().manual_seed(0), sampler)
            r = roughness(images)
            row = {
                "ckpt": ckpt,
                "global_step": record["global_step"],
                "sampler": name,
                "speckled": float((r > threshold).float().mean()),
                "roughness_median": float(r.median()),
                "real_roughness_p99": threshold,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    write_json(args.out, rows)


if __name__ == "__main__":
    main()

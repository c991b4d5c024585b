"""Quality per compute: difflab's ``make train`` model against a plain diffusers loop with the same recipe, each
sampled with its own samplers and with the other's, FID/IS on difflab's Fashion-MNIST feature nets (issue 27).

    python experiments/bench/quality.py                      # = make bench ARGS="--quality --peer diffusers"
    python experiments/bench/quality.py --variants quickstart no_ema_warmup --seeds 0 1 --tag cpu

For each training seed: ``experiment=quickstart seed=S`` (900 steps of batch 64 on 16x16 Fashion-MNIST, Adam 2e-3
with 100 warm-up steps, EMA 0.995, linear β with T = 1000; ``--variants`` adds the ablations of ``VARIANTS``) and the
peer (``quality_peer.py``), trained once into ``logs/bench_quality/<tag>/``. Every model is sampled with difflab's
samplers (``OURS``: sample.py's default and the probes of its settings) and with diffusers' schedulers (our models
through the diffusers export, ``src/export.py format=diffusers``; the peer directly), ``--num-samples`` images per
cell, batch b from the generator seeded b. FID and IS against ``--num-real`` Fashion-MNIST test images at 16x16 (the
same round trip as the samples) on each ``--feature-nets`` (difflab's classifiers: NOT Inception numbers). One JSON
line per cell on stdout; the whole table in ``experiments/bench/quality_<tag>.json``, where a cell already there (same
model, seed and sampler) is not run again (``--fresh``: a new table).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.utils.paths import write_text_atomic  # noqa: E402
from experiments.bench.quality_peer import PeerNet, diffusers_schedulers, draw_diffusers, load_peer, train_peer  # noqa: E402
from experiments.common import ROOT, ensure_checkpoint, real_metrics  # noqa: E402

# Training variants of our model: the quickstart and the ablations of issue 27, one factor each.
VARIANTS: dict[str, list[str]] = {
    "quickstart": [],
    "no_ema_warmup": ["callbacks.ema.warmup=false"],
    "no_grad_clip": ["trainer.gradient_clip_val=null"],
    "flip": ["data.random_flip=true"],
    "attn_8": ["net.attention_resolutions=[8,4]"],
}
# Our samplers: conf/sampler/<conf> with overrides, at a number of steps (sample.py's default first).
OURS: dict[str, tuple[str, dict[str, Any], int]] = {
    "ours dpmpp_2m_sde 20 (sample.py)": ("dpmpp_2m_sde", {}, 20),  # no clipping since issue 27
    "ours dpmpp_2m_sde 20, clip (old default)": ("dpmpp_2m_sde", {"clip_denoised": True}, 20),
    "ours dpmpp_2m_sde 20, model's sigma_max": ("dpmpp_2m_sde", {"sigma_max": None}, 20),
    "ours dpmpp_2m_sde 20, clip, model's sigma_max": ("dpmpp_2m_sde", {"clip_denoised": True, "sigma_max": None}, 20),
    "ours dpmpp_2m 10": ("dpmpp_2m", {}, 10),
    "ours dpmpp_2m 10, no clip, model's sigma_max": ("dpmpp_2m", {"clip_denoised": False, "sigma_max": None}, 10),
    "ours ddim 50 trailing": ("ddim", {}, 50),
}
RENAMED_NOTE = "dpmpp_2m_sde rows recorded with its old default (clip_denoised: true) carry today's names"
# Rows recorded before issue 27 changed dpmpp_2m_sde's default (clip_denoised: true → false), under today's names.
RENAMED = {
    "ours dpmpp_2m_sde 20 (sample.py)": "ours dpmpp_2m_sde 20, clip (old default)",
    "ours dpmpp_2m_sde 20, no clip": "ours dpmpp_2m_sde 20 (sample.py)",
    "ours dpmpp_2m_sde 20, model's sigma_max": "ours dpmpp_2m_sde 20, clip, model's sigma_max",
    "ours dpmpp_2m_sde 20, no clip, model's sigma_max": "ours dpmpp_2m_sde 20, model's sigma_max",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["quickstart"], choices=sorted(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=900, help="training steps of every model")
    p.add_argument("--peer", choices=["diffusers", "none"], default="diffusers")
    p.add_argument("--samplers", nargs="+", default=None, help="names of OURS and diffusers' to run (default: all)")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--num-real", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--feature-nets", nargs="+", default=["fmnist_cls_v2", "fmnist_cls"])
    p.add_argument("--tag", default="cpu")
    p.add_argument("--logs-dir", type=Path, default=None, help="where the models go (logs/bench_quality/<tag>)")
    p.add_argument("--out", type=Path, default=None, help="the JSON table (experiments/bench/quality_<tag>.json)")
    p.add_argument("--fresh", action="store_true", help="start a new table (default: add to --out's rows)")
    p.add_argument("--quality", action="store_true", help="accepted for `make bench ARGS=--quality`")
    p.add_argument("--net", choices=["unet_s"], default="unet_s", help="the quickstart's net (make bench passes it)")
    p.add_argument("--device", choices=["cpu"], default="cpu", help="the quickstart's budget is a CPU's")
    return p.parse_args(argv)


def our_factory(conf: str, overrides: dict[str, Any]):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    return instantiate(OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "sampler" / f"{conf}.yaml"), overrides))


@torch.no_grad()
def draw_ours(module: Any, conf: str, overrides: dict[str, Any], steps: int, args) -> torch.Tensor:
    sampler = module.build_sampler(our_factory(conf, overrides))
    chunks = []
    for b, first in enumerate(range(0, args.num_samples, args.batch_size)):
        n = min(args.batch_size, args.num_samples - first)
        chunks.append(module.sample(n, torch.Generator().manual_seed(b), sampler, steps, progress=False))
    return torch.cat(chunks)


def peer_module(unet: torch.nn.Module) -> Any:
    """A DiffusionModule around the peer (ε-prediction, linear β, T = 1000): difflab's samplers on its network."""
    from difflab.modules import DiffusionModule
    from difflab.schedules import GaussianDiffusion

    return DiffusionModule(
        net=lambda **kw: PeerNet(unet),
        schedule=GaussianDiffusion("linear"),
        image_shape=(1, 16, 16),
        optimizer=torch.optim.Adam,
    ).eval()


def exported_unet(module: Any, record: dict[str, Any], out: Path) -> torch.nn.Module:
    """Our model through the diffusers export (what `src/export.py format=diffusers` writes), loaded by diffusers."""
    from diffusers import UNet2DModel

    from difflab.tasks.export_diffusers import export_diffusers

    if not (out / "unet").is_dir():
        export_diffusers(module, record, out)
    return UNet2DModel.from_pretrained(out / "unet").eval()


def models(args, logs: Path, test_set) -> list[tuple[str, int, Any, torch.nn.Module, dict]]:
    """(name, seed, difflab module, diffusers UNet, training record) of every model, trained when missing."""
    from difflab.modules import load_module

    found = []
    for seed in args.seeds:
        for variant in args.variants:
            run = logs / f"{variant}_s{seed}"
            overrides = ["experiment=quickstart", f"seed={seed}", f"trainer.max_steps={args.steps}"]
            ckpt = ensure_checkpoint(run, [*overrides, "samples.num_samples=0", *VARIANTS[variant]], True)
            module, record = load_module(ckpt)
            summary = json.loads((run / "run_summary.json").read_text())
            info = {
                "train_seconds": summary.get("wall_time_s"),
                "train_images_per_s": summary.get("train_images_per_s"),
            }
            found.append((variant, seed, module, exported_unet(module, record, run / "diffusers"), info))
        if args.peer == "diffusers":
            from difflab.data import FashionMNISTDataModule

            data = FashionMNISTDataModule(str(ROOT / "data"), image_size=16, batch_size=64, val_size=512, seed=seed)
            data.setup("fit")
            weights = train_peer(data.train, logs / f"peer_s{seed}", seed, args.steps)
            info = json.loads((weights.parent / "peer.json").read_text())
            unet = load_peer(weights)
            found.append(("diffusers peer", seed, peer_module(unet), unet, info))
    return found


def previous_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of an earlier table, those recorded before ``RENAMED`` under today's sampler names."""
    table = json.loads(out.read_text())
    if "renamed" not in table:
        for row in table["rows"]:
            row["sampler"] = RENAMED.get(row["sampler"], row["sampler"])
    return table["rows"]


def main(argv: list[str] | None = None) -> None:
    from difflab.data import FashionMNISTDataModule
    from difflab.utils.config import register_resolvers

    register_resolvers()
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    logs = args.logs_dir or ROOT / "logs" / "bench_quality" / args.tag
    test = FashionMNISTDataModule(str(ROOT / "data"), image_size=16, batch_size=500)
    test.setup("test")
    judges = {
        net: real_metrics(
            test.test, args.num_real, ("fid", "is"), net, torch.device("cpu"), {"data": "fashion_mnist test 16x16"}
        )
        for net in args.feature_nets
    }
    out = args.out or ROOT / "experiments" / "bench" / f"quality_{args.tag}.json"
    rows = previous_rows(out) if out.is_file() and not args.fresh else []
    done = {(r["model"], r["seed"], r["sampler"]) for r in rows}  # a stopped run goes on where it was
    for name, seed, module, unet, info in models(args, logs, test.test):
        for sampler, draw in cells(module, unet, args):
            if (name, seed, sampler) in done:
                continue
            start = time.perf_counter()
            images = draw()
            row = {"model": name, "seed": seed, "sampler": sampler}
            row["sample_seconds"] = round(time.perf_counter() - start, 1)
            for gm in judges.values():
                gm.update_fake(images)
                row.update(gm.compute())
            row.update(info)
            print(json.dumps(row), flush=True)
            rows.append(row)
            table = {"args": vars(args), "rows": rows, "renamed": RENAMED_NOTE}
            write_text_atomic(out, json.dumps(table, indent=2, default=str))


def cells(module: Any, unet: torch.nn.Module, args) -> list[tuple[str, Any]]:
    """(sampler name, a function drawing the samples) for every sampler asked for, ours then diffusers'."""
    found = [(k, functools.partial(draw_ours, module, *c, args)) for k, c in OURS.items()]
    found += [
        (k, functools.partial(draw_diffusers, unet, *s, args.num_samples, args.batch_size, 0))
        for k, s in diffusers_schedulers().items()
    ]
    return [(k, draw) for k, draw in found if not args.samplers or k in args.samplers]


if __name__ == "__main__":
    main()

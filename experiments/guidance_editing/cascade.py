"""A cascade (base model → upscaler) against a single model at the high resolution, at about equal training compute.

    python experiments/guidance_editing/cascade.py            # the CPU run of RESULTS_cascade.md (8 → 16 vs 16)
    python experiments/guidance_editing/cascade.py --scale gpu --device cuda --num-samples 10000   # 16 → 32 vs 32

CPU scale (labelled as such): the issue's 16 → 32 cascade at half the side, on 2 shared CPU cores: a base at 8x8 and
an upscaler 8 → 16 (``experiment=cascade_fmnist`` with ``data.image_size=16 model.low_res_size=8``) against a single
16x16 model (iddpm_nll's CPU model: the `make train` setup, 1500 steps), all with unet_s, the cosine schedule,
batch 64. Training compute is counted as 3 × Gflops per forward × images seen (forward + backward), with the
Gflops of each network (the upscaler's includes its extra input channels). The models are trained with src/train.py
unless their checkpoints exist. Every model samples with DDIM (η = 0, 50 trailing steps); the upscaler at augmentation
levels ``--aug-levels``; "base, bilinear" is the base's samples upsampled without the upscaler. FID against
``--num-real`` test images on difflab's Fashion-MNIST classifier (fid_fmnist_cls, NOT comparable to Inception FIDs).
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

from difflab.modules.upscaler import downsample, upsample  # noqa: E402
from difflab.samplers import DDIMSampler  # noqa: E402
from difflab.utils.images import save_grid  # noqa: E402
from experiments.common import ROOT, ensure_checkpoint, hardware, load, markdown_table, real_metrics  # noqa: E402

OUT = Path(__file__).parent
LOGS = ROOT / "logs" / "guidance_editing"
COSINE = "model=ddpm schedule=cosine task_name=guidance_editing"
SCALES = {  # name → {model: (run dir, src/train.py overrides)}
    "cpu": {
        "base": (LOGS / "cpu" / "base8", f"experiment=quickstart {COSINE} data.image_size=8 trainer.max_steps=1500"),
        "upscaler": (
            LOGS / "cpu" / "upscaler8to16",
            "experiment=cascade_fmnist schedule=cosine data.image_size=16 model.low_res_size=8 "
            "net.attention_resolutions=[4] trainer.max_steps=1125 callbacks.model_checkpoint.every_n_train_steps=250 "
            "callbacks.model_checkpoint.every_n_epochs=null",
        ),
        "single": (LOGS / "cpu" / "base16", "experiment=quickstart trainer.max_steps=1500 model=ddpm schedule=cosine"),
    },
    "gpu": {  # the 16 → 32 against a 32x32 model, same net; G32 ≈ 4 G16: 100k/4 + 75k ≈ 100k steps at 32
        "base": (LOGS / "gpu" / "base16", f"experiment=quickstart trainer=gpu {COSINE} trainer.max_steps=100000"),
        "upscaler": (
            LOGS / "gpu" / "upscaler",
            "experiment=cascade_fmnist trainer=gpu schedule=cosine trainer.max_steps=75000",
        ),
        "single": (
            LOGS / "gpu" / "single32",
            f"experiment=quickstart trainer=gpu {COSINE} data.image_size=32 net.attention_resolutions=[8] "
            "trainer.max_steps=100000",
        ),
    },
}


def training_compute(module, record) -> dict[str, float]:
    """Gflops per forward (multiply-adds), steps, batch, and the training compute 3·G·steps·batch (forward +
    backward) in 10^12 multiply-adds."""
    gflops = module.gflops_per_forward()
    steps, batch = int(record["global_step"]), int(record["config"]["data"]["batch_size"])
    return {"gflops": gflops, "steps": steps, "batch": batch, "train_tmac": 3 * gflops * steps * batch / 1000}


def draw(module, num: int, batch: int, device, seed: int, upscale_from=None, aug_level=None) -> torch.Tensor:
    """DDIM-50 samples (or upscales of ``upscale_from``), batch b from the generator seeded seed + b."""
    steps = min(50, module.diffusion.num_timesteps)
    sampler = module.build_sampler(functools.partial(DDIMSampler, steps=steps, spacing="trailing"))
    chunks = []
    for b, i in enumerate(range(0, num, batch)):
        g = torch.Generator(device=device).manual_seed(seed + b)
        n = min(batch, num - i)
        if upscale_from is None:
            chunks.append(module.sample(n, g, sampler).cpu())
        else:
            chunks.append(module.upscale(upscale_from[i : i + n].to(device), g, sampler, aug_level).cpu())
    return torch.cat(chunks)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--base-ckpt", default=None, help="another base checkpoint (e.g. an earlier step's)")
    p.add_argument("--upscaler-ckpt", default=None, help="another upscaler checkpoint (e.g. an earlier step's)")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--num-real", type=int, default=10000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--aug-levels", type=int, nargs="+", default=[50, 0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tag", default=None, help="results_cascade_<tag>.json (default: the scale)")
    p.add_argument("--upscaler-on-test", action="store_true", help="only the upscaler on real low-res test images")
    args = p.parse_args(argv)
    device, tag = torch.device(args.device), args.tag or args.scale
    ckpts = {
        name: ensure_checkpoint(run_dir, overrides.split()) for name, (run_dir, overrides) in SCALES[args.scale].items()
    }
    for name in ("base", "upscaler"):
        if getattr(args, f"{name}_ckpt"):
            ckpts[name] = Path(getattr(args, f"{name}_ckpt"))
    modules = {name: load(ckpt, device) for name, ckpt in ckpts.items()}
    compute = {name: training_compute(m, rec) for name, (m, rec, _) in modules.items()}
    single, single_record, test = modules["single"]
    gm = real_metrics(test, args.num_real, ("fid",), "fmnist_cls", device, {"data": single_record["config"]["data"]})
    result: dict[str, Any] = {"hardware": hardware(), "args": vars(args), "compute": compute, "rows": []}
    cascade_tflops = compute["base"]["train_tmac"] + compute["upscaler"]["train_tmac"]

    def row(name: str, images: torch.Tensor, tflops: float, seconds: float) -> None:
        gm.update_fake(images)
        entry = {"model": name, "train_tmac": round(tflops, 1), "sample_seconds": round(seconds, 1)}
        entry.update({k: float(v) for k, v in gm.compute().items()})
        print(entry, flush=True)
        result["rows"].append(entry)
        (OUT / f"results_cascade_{tag}.json").write_text(json.dumps(result, indent=2))

    floor = torch.stack([test[i][0] for i in range(min(args.num_samples, len(test)))])
    row("test images (the FID floor at this sample count)", floor, 0.0, 0.0)
    if args.upscaler_on_test:  # the upscaler alone, on the true low-res versions of the test images
        upscaler = modules["upscaler"][0]
        low = downsample(floor, upscaler.low_res_size)
        row("test images' low-res, bilinear", upsample(low, floor.shape[-1]).clamp(-1, 1), 0.0, 0.0)
        shown = [floor[:8], upsample(low[:8], floor.shape[-1])]
        for level in args.aug_levels:
            up = draw(upscaler, len(low), args.batch_size, device, args.seed + 10**6, low, level)
            row(f"upscaler on the test images' low-res, aug level {level}", up, compute["upscaler"]["train_tmac"], 0)
            shown.append(up[:8])
        save_grid(torch.cat(shown), OUT / f"cascade_{tag}.png", nrow=8)
        return
    start = time.time()
    high = draw(single, args.num_samples, args.batch_size, device, args.seed)
    row("single model", high, compute["single"]["train_tmac"], time.time() - start)
    start = time.time()
    low = draw(modules["base"][0], args.num_samples, args.batch_size, device, args.seed)
    base_seconds = time.time() - start
    size = high.shape[-1]
    row("base, bilinear upsampling", upsample(low, size).clamp(-1, 1), compute["base"]["train_tmac"], base_seconds)
    shown = [high[:8], upsample(low[:8], size)]
    for level in args.aug_levels:
        start = time.time()
        up = draw(modules["upscaler"][0], args.num_samples, args.batch_size, device, args.seed + 10**6, low, level)
        row(f"cascade, aug level {level}", up, cascade_tflops, base_seconds + time.time() - start)
        shown.append(up[:8])
    save_grid(torch.cat(shown), OUT / f"cascade_{tag}.png", nrow=8)  # rows: single, base bilinear, cascades
    keys = ["model", "train_tmac", "fid_fmnist_cls", "sample_seconds"]
    print(markdown_table(keys, [[r[k] for k in keys] for r in result["rows"]]))
    print(json.dumps(compute, indent=2))


if __name__ == "__main__":
    main()

"""The study's sample figure: 16 samples per method from the same initial noise, one labelled row each.

    python experiments/few_step/grids.py          # after run.py: reads the runs under logs/few_step

Rows: the teacher (its own sampler, DPM-Solver++(2M) SDE at 20 NFE), and each few-step model at its 1- or 2-step
cell of the table: progressive distillation (1 step), consistency distillation (1 and 2), consistency training (2),
the 2-rectified flow (1 Euler step) and its one-step distillation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from difflab.utils.labels import save_labelled_grid  # noqa: E402
from experiments.common import load  # noqa: E402
from experiments.few_step.run import LOGS, OUT, generate  # noqa: E402
from experiments.sampler_nfe.run import sampler_factory  # noqa: E402

ROWS = [  # (label, run dir under the logs, checkpoint (a glob), sampler file or None: its own, steps or None: its own)
    ("teacher, DPM-Solver++(2M) SDE, 20 NFE", "teacher", "last.ckpt", None, None),
    ("progressive distillation, 1 step", "progressive", "round_*_1steps.ckpt", None, None),
    ("consistency distillation, 1 step", "cd", "last.ckpt", None, 1),
    ("consistency distillation, 2 steps", "cd", "last.ckpt", None, 2),
    ("consistency training, 2 steps", "ct", "last.ckpt", None, 2),
    ("2-rectified flow, 1 Euler step", "rf", "last.ckpt", "flow_euler", 1),
    ("2-RF + one-step distillation", "rf_distill", "last.ckpt", "flow_euler", 1),
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", type=Path, default=LOGS)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT / "samples_cpu.png")
    args = p.parse_args(argv)
    device, images, tags = torch.device("cpu"), [], []
    for label, run, name, sampler_file, steps in ROWS:
        folder = args.logs / run / "checkpoints"
        ckpt = next(iter(sorted(folder.glob(name))), None)
        if ckpt is None:
            print(f"skipped (no {folder / name}): {label}")
            continue
        module, _, _ = load(ckpt, device)
        sampler = module.build_sampler(sampler_factory(sampler_file)) if sampler_file else None
        images.append(generate(module, sampler, steps, args.num, args.num, device, args.seed)[0].clamp(-1, 1))
        tags += [label] * args.num
    print(save_labelled_grid(torch.cat(images), args.out, nrow=args.num, tags=tags))


if __name__ == "__main__":
    main()

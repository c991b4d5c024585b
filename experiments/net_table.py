"""The README's table of network presets: parameters and Gflops per forward of every ``conf/net/*.yaml``, on 32x32x3
pixels and on 8x8x3 latents (kl-f4 / vq-f4 of 32x32 images), unconditional, ε output.

    python experiments/net_table.py            # print the table
    python experiments/net_table.py --write    # replace the table in README.md (between its net_table markers)

Counted on the meta device (shapes only, no memory, no arithmetic) with ``difflab.utils.flops.gflops_per_forward``:
multiply-adds, DiT's "Gflops". ``tests/integration/test_net_table.py`` checks that README.md holds this output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from difflab.utils.flops import gflops_per_forward  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
START, END = "<!-- net_table:start -->", "<!-- net_table:end -->"
SHAPES = {"32x32x3 pixels": (3, 32), "8x8x3 latents": (3, 8)}


def preset_order(path: Path) -> tuple:
    """UNets first, then DiTs by size (S, B, L, XL) and patch (2, 4, 8)."""
    name = path.stem
    if not name.startswith("dit_") or name == "dit_tiny":
        return (name.startswith("dit"), 0, 0, name)
    size, patch = name[4:-1], int(name[-1])
    return (True, ["s", "b", "l", "xl"].index(size) + 1, patch, name)


def measure(factory, channels: int, size: int) -> tuple[int, float, str] | None:
    """(parameters, Gflops, tokens or "") of the preset on (channels, size, size) inputs; None if it cannot."""
    try:
        with torch.device("meta"):
            net = factory(in_channels=channels, out_channels=channels, image_size=size, num_classes=None)
            x, t = torch.zeros(1, channels, size, size), torch.zeros(1, dtype=torch.long)
    except ValueError:  # e.g. unet_m's attention at 16x16 never occurs on 8x8 latents
        return None
    patch = getattr(net, "patch_size", None)
    tokens = f"{(size // patch) ** 2}" if patch else ""
    return sum(p.numel() for p in net.parameters()), gflops_per_forward(net, x, t), tokens


def gflops_cell(g: float) -> str:
    return f"{g:.1f}" if g >= 100 else f"{g:.2f}" if g >= 1 else f"{g:.3g}"


def table() -> str:
    header = ["`net=`", "architecture", "params (M)"]
    for shape in SHAPES:
        header += [f"Gflops, {shape}", "tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path in sorted((ROOT / "conf" / "net").glob("*.yaml"), key=preset_order):
        cfg = OmegaConf.load(path)
        factory = instantiate(cfg)
        cells = [f"`{path.stem}`", cfg._target_.rsplit(".", 1)[1]]
        results = [measure(factory, *shape) for shape in SHAPES.values()]
        params = next(r[0] for r in results if r is not None)  # the same at both shapes (3 channels in and out)
        cells.append(f"{params / 1e6:.2f}")
        for r in results:
            cells += ["–", "–"] if r is None else [gflops_cell(r[1]), r[2] or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_with_table(readme: str, generated: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"{README}: no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{generated}\n{END}{tail}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = p.parse_args()
    generated = table()
    if args.write:
        README.write_text(readme_with_table(README.read_text(), generated))
    print(generated)


if __name__ == "__main__":
    main()

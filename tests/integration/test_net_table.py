"""README.md's table of network presets is the output of experiments/net_table.py (not typed by hand)."""

from __future__ import annotations

import importlib.util

from tests.conftest import ROOT


def test_readme_holds_the_generated_net_table():
    spec = importlib.util.spec_from_file_location("net_table", ROOT / "experiments" / "net_table.py")
    net_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(net_table)
    generated = net_table.table()
    readme = (ROOT / "README.md").read_text()
    assert net_table.readme_with_table(readme, generated) == readme, "run: python experiments/net_table.py --write"
    assert "| `dit_xl2` | DiT | 673.65 | 118.6 | 256 |" in generated  # DiT-XL/2: 118.6 Gflops (the paper's)
    assert "| `unet_m` | UNet | 35.75 | 6.22 | – | – | – |" in generated  # DDPM's CIFAR-10 net; no 8x8 levels

"""README.md's table of network presets is the output of experiments/net_table.py (not typed by hand)."""

from __future__ import annotations

from tests.conftest import ROOT, load_experiment


def test_readme_holds_the_generated_net_table():
    net_table = load_experiment("net_table")
    generated = net_table.table()
    readme = (ROOT / "README.md").read_text()
    assert net_table.readme_with_table(readme, generated) == readme, "run: python experiments/net_table.py --write"
    assert "| `dit_xl2` | DiT | 673.65 | 118.6 | 256 |" in generated  # DiT-XL/2: 118.6 Gflops (the paper's)
    assert "| `unet_m` | UNet | 35.75 | 6.22 | – | – | – |" in generated  # DDPM's CIFAR-10 net; no 8x8 levels

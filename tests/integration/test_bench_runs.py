"""`make bench` must run on CPU (a smoke run: no timing is asserted)."""

import importlib.util
import json

import pytest

from tests.conftest import ROOT


def test_bench_script_runs_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "experiments" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(
        [
            "--net",
            "unet_s",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--image-size",
            "16",
            "--channels",
            "1",
            "--train-steps",
            "2",
            "--warmup-steps",
            "1",
            "--sample-steps",
            "2",
            "--sample-batch-size",
            "2",
            "--data-on-device",
            "--fused-optimizer",
        ]
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    kinds = {line["bench"]: line for line in lines}
    assert {"train_bare", "train_lightning", "sample", "ema_update", "summary"} <= set(kinds)
    ema = kinds["ema_update"]
    assert ema["difflab_syncs"] == 0 and ema["lightning_syncs"] > 0 and ema["difflab_ops"] < ema["lightning_ops"]
    assert kinds["train_bare"]["images_per_s"] > 0 and kinds["train_lightning"]["images_per_s"] > 0
    assert kinds["sample"]["image_steps_per_s"] > 0


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "experiments" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("net", ["unet_s", "unet_m"])
def test_diffusers_peer_has_the_same_shape(net):
    """The peer of `--peer diffusers` is the same network family: parameter count within 2% (unet_m: diffusers'
    DDPM CIFAR-10 UNet, 35.7M) and the same FLOPs per image within 5%."""
    pytest.importorskip("diffusers")
    import torch

    bench = _load_bench()
    args = bench.parse_args(["--net", net, "--channels", "3", "--image-size", "32"])
    ours, peer = bench.build_net(args), bench.build_net(args, "diffusers")
    n_ours, n_peer = bench.count_params(ours), bench.count_params(peer)
    assert abs(n_ours / n_peer - 1) < 0.02, (n_ours, n_peer)
    if net == "unet_m":
        assert 35.0e6 < n_peer < 36.5e6
    x, t = torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    f_ours = bench.forward_flops_per_image(ours, x, t)
    f_peer = bench.forward_flops_per_image(peer, x, t)
    assert abs(f_ours / f_peer - 1) < 0.05, (f_ours, f_peer)


def test_bench_with_peer_prints_ratios(capsys):
    pytest.importorskip("diffusers")
    bench = _load_bench()
    records = bench.main(
        "--net unet_s --device cpu --batch-size 2 --image-size 16 --channels 1 --train-steps 1 --warmup-steps 0 "
        "--sample-steps 1 --sample-batch-size 2 --peer diffusers --channels-last --skip-lightning".split()
    )
    summary = records[-1]
    assert summary["train_speedup_vs_diffusers"] > 0 and summary["sample_speedup_vs_diffusers"] > 0
    assert {r["bench"] for r in records} >= {"train_bare_diffusers", "sample_diffusers"}
    assert records[0]["gflop_per_image"] > 0

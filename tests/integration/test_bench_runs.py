"""`make bench` must run on CPU (a smoke run: no timing is asserted)."""

import json

import pytest
import torch

from tests.conftest import load_bench, load_experiment


def test_bench_script_runs_on_cpu(capsys):
    bench = load_bench()
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
    assert {"train_bare", "train_lightning", "sample", "ema_update", "accuracy", "summary"} <= set(kinds)
    assert kinds["summary"]["outputs_agree"] and kinds["summary"]["loss_curves_agree"]
    ema = kinds["ema_update"]
    assert ema["difflab_syncs"] == 0 and ema["lightning_syncs"] > 0 and ema["difflab_ops"] < ema["lightning_ops"]
    assert kinds["train_bare"]["images_per_s"] > 0 and kinds["train_lightning"]["images_per_s"] > 0
    assert kinds["sample"]["image_steps_per_s"] > 0


def test_diffusers_dit_peer_has_the_same_shape():
    """`--net dit_* --peer diffusers`: DiTTransformer2DModel of the same depth, width, heads and patches does the same
    arithmetic (FLOPs within 1%); its extra parameters are exactly the copies of the timestep MLP and class table
    that diffusers keeps in every block (AdaLayerNormZero)."""
    pytest.importorskip("diffusers")
    import torch

    bench = load_bench()
    args = bench.parse_args(["--net", "dit_s4", "--channels", "4", "--image-size", "32"])
    ours, peer = bench.build_net(args), bench.build_net(args, "diffusers")
    x, t = torch.zeros(1, 4, 32, 32), torch.zeros(1, dtype=torch.long)
    f_ours, f_peer = bench.forward_flops_per_image(ours, x, t), bench.forward_flops_per_image(peer, x, t)
    assert abs(f_ours / f_peer - 1) < 0.01, (f_ours, f_peer)
    width, depth = 384, 12
    timestep_mlp = 256 * width + width + width * width + width
    # diffusers: a timestep MLP and a 2-row class table (class 0 + its null class) in each block; difflab: one MLP
    assert bench.count_params(peer) - bench.count_params(ours) == depth * (timestep_mlp + 2 * width) - timestep_mlp


@pytest.mark.parametrize("net", ["unet_s", "unet_m"])
def test_diffusers_peer_has_the_same_shape(net):
    """The peer of `--peer diffusers` is the same network family: parameter count within 2% (unet_m: diffusers'
    DDPM CIFAR-10 UNet, 35.7M) and the same FLOPs per image within 5%."""
    pytest.importorskip("diffusers")
    import torch

    bench = load_bench()
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


@pytest.mark.parametrize("net", ["unet_s", "dit_tiny"])
def test_bench_with_peer_prints_ratios(net, capsys):
    pytest.importorskip("diffusers")
    bench = load_bench()
    records = bench.main(
        f"--net {net} --device cpu --batch-size 2 --image-size 16 --channels 1 --train-steps 1 --warmup-steps 0 "
        "--sample-steps 1 --sample-batch-size 2 --peer diffusers --channels-last --skip-lightning".split()
    )
    summary = records[-1]
    assert summary["train_speedup_vs_diffusers"] > 0 and summary["sample_speedup_vs_diffusers"] > 0
    assert {r["bench"] for r in records} >= {"train_bare_diffusers", "sample_diffusers"}
    assert records[0]["gflop_per_image"] > 0
    peer = next(r for r in records if r["bench"] == "train_bare_diffusers")
    assert records[0]["channels_last"] and not peer["channels_last"]  # --peer-levers anchor (the default)
    assert summary["peer_levers"] == "anchor"


def _accuracy(argv: str, optimise=None) -> dict:
    import torch

    bench = load_bench()
    args = bench.parse_args(f"--net unet_s --device cpu --batch-size 4 --image-size 16 --channels 1 {argv}".split())
    device = torch.device("cpu")
    if optimise is None:
        return bench.accuracy(args, device)
    return bench.bench_accuracy(
        args, device, bench.build_net(args), optimise, lambda: bench.autocast(args, device), bench.record
    )


@pytest.mark.parametrize("argv", ["--channels-last --fused-optimizer", "--precision bf16 --channels-last"])
def test_fast_path_keeps_accuracy(argv):
    """The issue's accuracy criterion as the benchmark measures it: same ε̂ within the precision's tolerance and the
    same loss curve, on a run whose loss really falls."""
    import torch

    try:
        acc = _accuracy(f"{argv} --accuracy-steps 20")
    except RuntimeError as err:
        # ATEN_CPU_CAPABILITY=default (or avx2) forced on an AVX-512 machine: oneDNN's bf16 attention packing still
        # sees the AVX-512 hardware and refuses. The forced kernels and the hardware disagree, as on no real CPU.
        if (
            "pack_vnni2 is only supported when avx512" in str(err)
            and torch.backends.cpu.get_cpu_capability() != "AVX512"
        ):
            pytest.skip(f"bf16 under forced {torch.backends.cpu.get_cpu_capability()} kernels: {err}")
        raise
    assert acc["outputs_agree"] and acc["loss_curves_agree"], acc
    assert acc["output_rel_err"] <= acc["output_rtol"] == (2e-2 if "bf16" in argv else 1e-4)
    assert acc["loss_plain"][-1] < 0.9 * acc["loss_plain"][0]  # the curve is a learning curve, not noise
    assert len(acc["loss_plain"]) == len(acc["loss_fast"]) == 10


def test_accuracy_check_catches_a_wrong_fast_path():
    """A fast path that changes the network's function by 5 % fails the outputs check; one that does not train
    (a compiler that loses the gradients would look so) fails the loss-curve check."""

    def scaled(net):
        net.register_forward_hook(lambda module, args, out: out * 1.05)
        return net

    def frozen(net):
        net.requires_grad_(False)
        net.out.requires_grad_(True)  # only the output layer trains
        return net

    acc = _accuracy("--accuracy-steps 20", optimise=scaled)
    assert not acc["outputs_agree"] and acc["output_rel_err"] > 0.04
    acc = _accuracy("--accuracy-steps 20", optimise=frozen)
    assert not acc["loss_curves_agree"] and acc["loss_final_rel_diff"] > 0.05


def test_peer_runs_as_the_anchor_unless_asked():
    bench = load_bench()
    args = bench.parse_args("--compile --channels-last --fused-optimizer".split())
    assert args.compile == "default" and args.peer_levers == "anchor"
    anchor = bench.peer_args(args)
    assert (anchor.compile, anchor.channels_last, anchor.fused_optimizer) == ("none", False, False)
    assert anchor.precision == args.precision and args.channels_last  # the run's own flags are untouched
    same = bench.parse_args("--compile reduce-overhead --peer-levers same".split())
    assert bench.peer_args(same) is same and same.compile == "reduce-overhead"


@pytest.mark.slow
def test_quality_benchmark_runs_both_models_and_the_export_path_agrees_with_diffusers(tmp_path):
    """`make bench ARGS="--quality --peer diffusers"` at tiny sizes: our quickstart and the diffusers peer, trained 2
    steps, each sampled by both families; DPM-Solver++(2M) without clipping and up to the model's σ_max on our model
    is diffusers' DPMSolverMultistep (Karras) on its export, sample for sample."""
    import json

    quality = load_experiment("bench/quality")
    samplers = ["ours dpmpp_2m 10, no clip, model's sigma_max", "diffusers dpmpp_2m karras", "ours ddim 50 trailing"]
    out = tmp_path / "quality.json"
    sizes = ["--steps", "2", "--num-samples", "8", "--num-real", "64", "--batch-size", "4", "--seeds", "0"]
    quality.main([*sizes, "--samplers", *samplers, "--logs-dir", str(tmp_path / "logs"), "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["sampler"]) for r in rows} == {
        (m, s) for m in ("quickstart", "diffusers peer") for s in samplers
    }
    assert all(r["fid_fmnist_cls_v2"] > 0 and r["fid_fmnist_cls"] > 0 for r in rows)
    ours = {r["sampler"]: r for r in rows if r["model"] == "quickstart"}
    assert ours[samplers[0]]["fid_fmnist_cls_v2"] == pytest.approx(ours[samplers[1]]["fid_fmnist_cls_v2"], rel=1e-4)
    # run again: the table is kept and no cell is drawn twice (a stopped benchmark goes on where it was)
    quality.main([*sizes, "--samplers", *samplers, "--logs-dir", str(tmp_path / "logs"), "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == rows


def test_speckle_roughness_is_the_mean_absolute_laplacian():
    """experiments/speckle: 0 for a flat image; 8 inside a ±1 checkerboard (|4·(±1) − 4·(∓1)|), less at the
    replicate-padded border."""
    speckle = load_experiment("speckle/run")
    flat = torch.full((1, 1, 6, 6), 0.3)
    board = (torch.arange(6)[:, None] + torch.arange(6)[None, :]) % 2 * 2.0 - 1.0
    assert speckle.roughness(flat).item() == 0.0
    r = speckle.roughness(board[None, None])
    interior, edge, corner = 16 * 8.0, 16 * 6.0, 4 * 4.0  # 4, 3 or 2 neighbours of the other sign
    assert r.item() == pytest.approx((interior + edge + corner) / 36)

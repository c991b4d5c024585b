"""sample.py with DDIM: generation, encode-decode reconstruction, interpolation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflab.tasks.sample import sample
from difflab.tasks.sample_modes import slerp
from tests.conftest import compose_config


@pytest.fixture
def checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


def run(ckpt, tmp_path, *overrides):
    return sample(compose_config([f"ckpt={ckpt}", *overrides], tmp_path, "sample"))


def test_ddim_generation_is_deterministic(checkpoint, tmp_path):
    a = run(checkpoint, tmp_path / "a", "sampler=ddim", "sampler.steps=5", "num_samples=3")
    b = run(checkpoint, tmp_path / "b", "sampler=ddim", "sampler.steps=5", "num_samples=3", "seed=0")
    np.testing.assert_array_equal(np.load(a["npz"])["arr_0"], np.load(b["npz"])["arr_0"])


def test_reconstruct_reports_psnr_ssim(checkpoint, tmp_path):
    result = run(checkpoint, tmp_path, "mode=reconstruct", "sampler=ddim", "sampler.steps=20", "num_samples=4")
    saved = json.loads((tmp_path / "reconstruct.json").read_text())
    assert saved["num_images"] == 4 and saved["psnr"] == pytest.approx(result["psnr"])
    assert np.isfinite(saved["psnr"]) and -1 <= saved["ssim"] <= 1
    assert result["grid"].is_file()


def test_interpolate_writes_a_strip(checkpoint, tmp_path):
    result = run(checkpoint, tmp_path, "mode=interpolate", "sampler=ddim", "sampler.steps=5", "num_interp=4")
    assert result["frames"] == 4 and result["grid"].is_file()


def test_modes_need_deterministic_ddim(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="sampler=ddim"):
        run(checkpoint, tmp_path, "mode=reconstruct")
    with pytest.raises(ValueError, match="mode="):
        run(checkpoint, tmp_path, "mode=dream")


def test_slerp_endpoints_and_norm():
    z0, z1 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1, rtol=1e-5, atol=1e-5)
    mid = slerp(z0, z1, 0.5)
    assert mid.flatten(1).norm(dim=1).min() > 0.9 * z0.flatten(1).norm(dim=1).min()  # no collapse toward 0


def test_reconstruction_metrics_callback_on_a_diffusion_model(tiny_cfg, caplog):
    from difflab.tasks.train import train

    result = train(
        tiny_cfg(
            "callbacks=[default,reconstruction_metrics]",
            "callbacks.reconstruction_metrics.max_batches=1",
            "callbacks.reconstruction_metrics.lpips_net=null",
            "trainer.max_steps=2",
            "trainer.limit_train_batches=2",
        )
    )
    assert 0 < result["metrics"]["val/psnr"] and -1 <= result["metrics"]["val/ssim"] <= 1


@pytest.mark.parametrize("sampler", ["ddim", pytest.param("unipc", marks=pytest.mark.slow)])
def test_torchrun_two_processes_draw_shares_and_gather_them(checkpoint, tmp_path, sampler):
    """`torchrun --nproc_per_node 2 src/sample.py`: rank r draws samples r, r+2, ... with seed + r; rank 0 writes all
    of them in order. With a deterministic sampler (DDIM; UniPC, a multistep solver), rank 0 (seed 0) reproduces the
    single-process samples 0 and 1 at 0, 2."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "ddp"
    args = [f"ckpt={checkpoint}", "num_samples=5", "device=cpu", f"sampler={sampler}", "sampler.steps=3"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [str(ROOT / "src" / "sample.py"), *args, f"hydra.run.dir={out}"],
        cwd=tmp_path,
        env={**os.environ, "DIFFLAB_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    shared = np.load(out / "samples.npz")["arr_0"]
    assert shared.shape[0] == 5
    assert not np.array_equal(shared[0], shared[1])  # distinct seeds per rank
    single = np.load(run(checkpoint, tmp_path / "one", *args[1:])["npz"])["arr_0"]
    np.testing.assert_array_equal(shared[0], single[0])
    np.testing.assert_array_equal(shared[2], single[1])  # rank 0's second sample lands at index 2


def test_gather_shards_restores_the_order(monkeypatch):
    """gather_shards on "rank 0 of 3" with unequal shares of 7 samples: all_gather (simulated here; the real one
    runs in the torchrun test above) returns the padded shares of every rank, and the result is the 7 samples in
    their original order."""
    from difflab.utils import distributed
    from difflab.utils.distributed import gather_shards, shard

    num, world = 7, 3
    parts = [shard(num, r, world) for r in range(world)]
    assert sorted(torch.cat(parts).tolist()) == list(range(num))
    assert [p.numel() for p in parts] == [3, 2, 2]

    def share(rank: int) -> torch.Tensor:  # sample i is filled with the value i
        return torch.stack([torch.full((2, 2), float(i)) for i in shard(num, rank, world)])

    def all_gather(outputs: list[torch.Tensor], padded: torch.Tensor) -> None:
        assert padded.shape[0] == 3  # every share padded to the longest
        for rank, out in enumerate(outputs):
            out.zero_()
            out[: parts[rank].numel()] = share(rank)

    monkeypatch.setattr(distributed, "rank_world", lambda: (0, world))
    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)
    expected = torch.arange(num, dtype=torch.float32)[:, None, None].expand(num, 2, 2)
    torch.testing.assert_close(gather_shards(share(0), num), expected)
    monkeypatch.undo()
    single = torch.randn(4, 3)
    assert gather_shards(single, 4) is single  # one process: the identity

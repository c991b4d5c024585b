"""Opening a checkpoint never runs code from it: a crafted pickle payload is refused through every entry point before
anything of it executes; difflab's own files (checkpoints of every kind, shipped weights) open with weights_only;
a file that needs full unpickling opens only with trust_checkpoint=true."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from difflab.losses.perceptual import build_perceptual
from difflab.metrics.feature_nets import (
    INCEPTION_FILE,
    INCEPTION_SHA256,
    load_classifier,
    lpips_weights_path,
    make_metric,
)
from difflab.tasks.eval import evaluate
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from difflab.utils.checkpoint_io import (
    UnsafeCheckpointError,
    load_checkpoint,
    trusted_checkpoints,
    verify_weights_file,
)
from tests.conftest import ROOT, TINY, compose_config, run_cli


class Payload:
    """Unpickled in full, it writes ``marker``: what an attacker's file would do with a shell command instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code from the checkpoint ran')",)


@pytest.fixture
def real_checkpoint(tiny_checkpoint) -> str:
    return tiny_checkpoint


@pytest.fixture
def crafted(real_checkpoint, tmp_path) -> tuple[Path, Path]:
    """A real difflab checkpoint with a payload beside its keys, and the file the payload would create."""
    marker = tmp_path / "pwned"
    checkpoint = torch.load(real_checkpoint, weights_only=True)
    checkpoint["extra"] = Payload(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def refused(marker: Path, call) -> str:
    """The message of the UnsafeCheckpointError ``call`` raises (Hydra's instantiate wraps it for model=ldm)."""
    with pytest.raises(Exception) as info:
        call()
    assert not marker.exists(), "the payload ran"
    error = info.value if isinstance(info.value, UnsafeCheckpointError) else info.value.__cause__
    assert isinstance(error, UnsafeCheckpointError), info.value
    assert "refused" in str(error) and "trust_checkpoint=true" in str(error) and "(exec)" in str(error)
    return str(error)


def test_sample_cli_refuses_a_crafted_checkpoint(crafted, tmp_path):
    path, marker = crafted
    proc = run_cli("sample.py", f"ckpt={path}", "num_samples=2", cwd=tmp_path)
    assert proc.returncode != 0 and not marker.exists()
    assert "UnsafeCheckpointError" in proc.stderr and f"ckpt='{path}': refused" in proc.stderr


def test_every_entry_point_refuses_a_crafted_checkpoint(crafted, real_checkpoint, tmp_path):
    path, marker = crafted
    out = tmp_path / "out"
    refused(marker, lambda: sample(compose_config([f"ckpt={path}", "num_samples=2"], out, "sample")))
    refused(marker, lambda: evaluate(compose_config([f"ckpt={path}", "metrics=[nll]"], out, "eval")))
    message = refused(marker, lambda: train(compose_config([*TINY, f"ckpt_path={path}"], out)))
    assert message.startswith(f"ckpt_path='{path}'")
    for key, extra in (("classifier_ckpt", []), ("upscaler_ckpt", ["mode=cascade"])):
        cfg = compose_config([f"ckpt={real_checkpoint}", f"+{key}={path}", "num_samples=2", *extra], out, "sample")
        assert refused(marker, lambda cfg=cfg: sample(cfg)).startswith(f"{key}='{path}': refused")
    ldm = [*TINY, "model=ldm", f"model.autoencoder_ckpt={path}", "debug=fast"]
    message = refused(marker, lambda: train(compose_config(ldm, out)))
    assert message.startswith(f"model.autoencoder_ckpt='{path}'")


def test_feature_net_and_statistics_files_are_opened_safely(crafted, tmp_path):
    _, marker = crafted
    torch.save({"state_dict": {}, "net_kwargs": {}, "meta": Payload(marker)}, tmp_path / "fmnist_cls.pt")
    refused(marker, lambda: load_classifier("fmnist_cls", weights_dir=tmp_path))
    torch.save({"mu": Payload(marker)}, tmp_path / "stats.pt")
    refused(marker, lambda: load_checkpoint(tmp_path / "stats.pt", "cache_dir"))


def payload_file(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"conv.weight": torch.zeros(1), "x": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("placed", ["inception_weights", "torch_home"])
def test_inception_weights_are_checked_before_torch_fidelity_unpickles_them(placed, tmp_path, monkeypatch):
    """torch-fidelity opens its weights with weights_only=False: a file given as inception_weights= or placed where
    the README says ($TORCH_HOME/hub/checkpoints/) must be the published one (SHA-256) or trusted."""
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = payload_file(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE, marker)
    given = str(path) if placed == "inception_weights" else None
    with pytest.raises(UnsafeCheckpointError, match=f"SHA-256 is .*not the published file's \\({INCEPTION_SHA256}\\)"):
        make_metric("fid", "inception", inception_weights=given)
    assert not marker.exists()
    with trusted_checkpoints(True), pytest.raises(Exception):  # noqa: B017  (not an Inception: it fails after the code ran)
        make_metric("fid", "inception", inception_weights=given)
    assert marker.exists(), "the route is live: trusted, the file is handed over and unpickled in full"


def test_eval_refuses_crafted_inception_weights(tiny_checkpoint, tmp_path):
    marker = tmp_path / "pwned"
    path = payload_file(tmp_path / INCEPTION_FILE, marker)
    cfg = compose_config(
        [f"ckpt={tiny_checkpoint}", "metrics=[fid]", "feature_net=inception", f"inception_weights={path}"],
        tmp_path / "out",
        "eval",
    )
    with pytest.raises(UnsafeCheckpointError, match="inception_weights="):
        evaluate(cfg)
    assert not marker.exists()


def test_lpips_backbones_are_checked_before_torchvision_unpickles_them(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = payload_file(lpips_weights_path("alex"), marker)
    with pytest.raises(UnsafeCheckpointError, match="lpips_net=alex.*SHA-256 is .*7be5be79"):
        build_perceptual("lpips")
    assert not marker.exists()
    # a file whose hash starts as the name says (a forged prefix) must still open weights-only
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UnsafeCheckpointError, match="exec"):
        verify_weights_file(path, "lpips_net=alex", digest[:8])
    assert not marker.exists()
    assert verify_weights_file(path, "lpips_net=alex", digest) == path  # the whole digest: the file it names


def test_an_older_checkpoint_with_python_objects_needs_trust_checkpoint(real_checkpoint, tmp_path):
    """E.g. a run record stored as an OmegaConf object: refused with the message, opened with the opt-in."""
    checkpoint = torch.load(real_checkpoint, weights_only=True)
    checkpoint["difflab"]["config"] = OmegaConf.create(checkpoint["difflab"]["config"])
    path = tmp_path / "older.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(UnsafeCheckpointError, match="omegaconf"):
        sample(compose_config([f"ckpt={path}", "num_samples=2"], tmp_path / "a", "sample"))
    result = sample(
        compose_config([f"ckpt={path}", "num_samples=2", "trust_checkpoint=true"], tmp_path / "b", "sample")
    )
    assert np.load(result["npz"])["arr_0"].shape[0] == 2


def test_shipped_weights_open_with_weights_only():
    shipped = sorted((ROOT / "src" / "difflab").glob("**/weights/*.pt"))
    assert len(shipped) >= 3
    for path in shipped:
        assert isinstance(torch.load(path, weights_only=True), dict), path


def test_difflab_checkpoints_open_with_weights_only(real_checkpoint):
    """What train.py writes (Lightning's keys, the run record, EMA, the random states) needs no allow-list; the
    other model types are checked where their tests load their checkpoints (weights_only=True throughout)."""
    checkpoint = torch.load(real_checkpoint, weights_only=True)
    assert {"state_dict", "current_model_state", "difflab", "training_random_state", "loops"} <= set(checkpoint)


def test_a_corrupt_file_is_unreadable_not_unsafe(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="cannot be read as a PyTorch checkpoint") as info:
        load_checkpoint(tmp_path / "junk.ckpt")
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_lightning_resumes_from_the_checkpoint_weights_only(tiny_checkpoint, tmp_path, monkeypatch):
    """``Trainer.fit(ckpt_path=...)`` unpickles the file itself: it must get weights_only=True unless the user opted
    in (a crafted file passing read_run_record's check would otherwise run there)."""
    import lightning.pytorch as pl

    asked = []

    class Stop(Exception):
        pass

    def spy(self, *args, **kwargs):
        asked.append((kwargs.get("ckpt_path"), kwargs.get("weights_only")))
        raise Stop

    monkeypatch.setattr(pl.Trainer, "fit", spy)
    for trust in ("false", "true"):
        with pytest.raises(Stop):
            train(
                compose_config([*TINY, f"ckpt_path={tiny_checkpoint}", f"trust_checkpoint={trust}"], tmp_path / trust)
            )
    assert asked == [(tiny_checkpoint, True), (tiny_checkpoint, False)]

"""Issue 22, the user's day: outputs land where asked (missing folders created, results printed before they are
written, no stray run dirs, a user cache folder), EMA weights that are still the random start are flagged and
``weights=raw`` samples the trained ones, and progress bars show on a terminal only."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys

import pytest
import torch

from difflab.callbacks.ema import start_weight, young_ema_warning
from difflab.modules import load_module
from difflab.tasks.eval import evaluate
from difflab.tasks.sample import sample
from difflab.utils.checkpoint_io import load_checkpoint
from difflab.utils.paths import user_cache_dir
from difflab.utils.progress import LineProgress, SamplingProgress, count_forwards, progress_iter, progress_line
from tests.conftest import TINY, cli_ok, compose_config, run_cli
from tests.unit.test_metrics import weights_dir  # noqa: F401  (fixture)

# its module-scoped checkpoints are trained once: the whole module runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_outputs_and_progress")


@pytest.fixture(scope="module")
def young_ema_ckpt(tmp_path_factory):
    """3 training steps, EMA decay 0.9 without warm-up: its weights are still 81 % the first update's."""
    from difflab.tasks.train import train

    out = tmp_path_factory.mktemp("young_ema")
    overrides = [*TINY, "trainer.max_steps=3", "trainer.limit_train_batches=3", "callbacks.ema.warmup=false"]
    return train(compose_config(overrides, out))["checkpoint"]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


# ---------------------------------------------------------------- 1. results are never lost to a missing folder
def test_reconstruct_creates_out_dir_and_logs_psnr_ssim(young_ema_ckpt, tmp_path, caplog):
    out = tmp_path / "new" / "nested"
    with caplog.at_level(logging.INFO):
        result = sample(
            compose_config(
                [
                    f"ckpt={young_ema_ckpt}",
                    "mode=reconstruct",
                    "sampler=ddim",
                    "sampler.steps=4",
                    "num_samples=2",
                    f"out_dir={out}",
                ],
                tmp_path / "run",
                "sample",
            )
        )
    saved = json.loads((out / "reconstruct.json").read_text())
    assert saved["psnr"] == pytest.approx(result["psnr"]) and (out / "reconstruct.png").is_file()
    assert f"PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f}" in caplog.text
    assert str(out / "reconstruct.png") in caplog.text and str(out / "reconstruct.json") in caplog.text


def test_interpolate_logs_where_it_wrote(young_ema_ckpt, tmp_path, caplog):
    out = tmp_path / "a" / "b"
    with caplog.at_level(logging.INFO):
        sample(
            compose_config(
                [
                    f"ckpt={young_ema_ckpt}",
                    "mode=interpolate",
                    "sampler=ddim",
                    "sampler.steps=3",
                    "num_interp=3",
                    f"out_dir={out}",
                ],
                tmp_path / "run",
                "sample",
            )
        )
    assert (out / "interpolate.png").is_file() and f"Wrote {out / 'interpolate.png'} (3 frames)" in caplog.text


EVAL = ["metrics=[nll]", "nll_images=2", "batch_size=2", "num_samples=2", "num_real=2"]


def test_eval_creates_the_folder_of_out(young_ema_ckpt, tmp_path):
    out = tmp_path / "new" / "dir" / "x.json"
    evaluate(compose_config([f"ckpt={young_ema_ckpt}", *EVAL, f"out={out}"], tmp_path / "run", "eval"))
    assert json.loads(out.read_text())["results"]["nll_images"] == 2


def test_eval_prints_results_before_writing(young_ema_ckpt, tmp_path, capsys, monkeypatch):
    """A folder that cannot be written fails before any work (test_eval.py); a write that fails at the end (a disk
    filled meanwhile) must not lose the numbers: they are printed first."""
    import errno

    import difflab.tasks.eval as eval_task

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, f"No space left on device while writing {path}")

    monkeypatch.setattr(eval_task, "write_text_atomic", disk_full)
    cfg = compose_config([f"ckpt={young_ema_ckpt}", *EVAL, f"out={tmp_path / 'x.json'}"], tmp_path / "run", "eval")
    with pytest.raises(OSError, match="No space left"):
        evaluate(cfg)
    printed = capsys.readouterr().out
    assert "nll_total_bpd" in printed and "nll_images" in printed  # the numbers reached the screen anyway


# ---------------------------------------------------------------- 2. EMA weights that are still the random start
def test_start_weight_closed_forms():
    assert start_weight(0.995, False, 150) == pytest.approx(0.995**149)
    warm = math.prod(min(0.9, (1 + n) / (10 + n)) for n in range(1, 50))
    assert start_weight(0.9, True, 50) == pytest.approx(warm)
    assert start_weight(0.9999, True, 100_000) == 0.0 and start_weight(0.9, False, 0) == 1.0
    # the threshold is ~1/(1 - decay) updates without warm-up; with it, far fewer suffice
    assert young_ema_warning(0.995, False, 150) and not young_ema_warning(0.995, False, 250)
    assert not young_ema_warning(0.995, True, 150)
    assert "weights=raw" in young_ema_warning(0.995, False, 150)


def test_sampling_young_ema_warns_and_raw_weights_are_the_trained_ones(young_ema_ckpt, caplog):
    checkpoint = load_checkpoint(young_ema_ckpt)
    assert int(checkpoint["averaging_state"]["n_averaged"]) == 3  # the checkpoint records the update count
    with caplog.at_level(logging.WARNING):
        ema, _ = load_module(young_ema_ckpt)
    assert "the EMA weights have seen 3 updates at decay 0.9 without warm-up" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        raw, _ = load_module(young_ema_ckpt, weights="raw")
    assert "EMA" not in caplog.text
    for name, value in raw.state_dict().items():
        if name in checkpoint["current_model_state"]:
            torch.testing.assert_close(value, checkpoint["current_model_state"][name])
    differs = [not torch.equal(a, b) for a, b in zip(ema.parameters(), raw.parameters(), strict=True)]
    assert any(differs)
    with pytest.raises(ValueError, match="weights='best'"):
        load_module(young_ema_ckpt, weights="best")


def test_train_warns_when_its_final_samples_use_a_young_ema(tiny_cfg, caplog):
    from difflab.tasks.train import train

    with caplog.at_level(logging.WARNING):
        train(tiny_cfg("trainer.max_steps=2", "trainer.limit_train_batches=2", "callbacks.ema.warmup=false"))
    assert (
        "Final samples: the EMA weights have seen 2 updates" in caplog.text and "sample.py weights=raw" in caplog.text
    )


def test_sample_and_eval_take_weights_raw(young_ema_ckpt, tmp_path):
    args = [f"ckpt={young_ema_ckpt}", "sampler=ddim", "sampler.steps=3", "num_samples=2"]
    a = sample(compose_config([*args, "weights=raw"], tmp_path / "raw", "sample"))
    b = sample(compose_config([*args, "weights=ema"], tmp_path / "ema", "sample"))
    import numpy as np

    assert not np.array_equal(np.load(a["npz"])["arr_0"], np.load(b["npz"])["arr_0"])
    report = evaluate(compose_config([f"ckpt={young_ema_ckpt}", *EVAL, "weights=raw"], tmp_path / "ev", "eval"))
    assert report["weights"] == "raw"


def test_quickstart_and_ldm_warm_up_their_ema(tmp_path):
    for experiment in ("quickstart", "ldm"):
        cfg = compose_config([f"experiment={experiment}"], tmp_path)
        assert cfg.callbacks.ema.warmup is True, experiment


# ---------------------------------------------------------------- 3. progress on a terminal only
def test_bars_show_on_a_terminal_and_count_the_work(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    net = torch.nn.Linear(2, 2)
    with count_forwards(net, 3, "encode-decode") as bar:
        for _ in range(3):
            net(torch.zeros(1, 2))
    assert bar.n == 3 and "encode-decode" in tty.getvalue()
    assert list(progress_iter(range(4), 4, "NLL", "batch")) == [0, 1, 2, 3] and "NLL" in tty.getvalue()
    quiet = SamplingProgress(2, 5, 5, enabled=False)  # progress=false
    assert quiet.bar.disable


def test_bars_are_lines_without_a_terminal(monkeypatch, caplog):
    """No tqdm bar (carriage returns) off a terminal: log lines, at most every LINE_SECONDS and once at the end."""
    import logging

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert isinstance(SamplingProgress(2, 5, 5).bar, LineProgress)
    net = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.INFO, logger="difflab.progress"):
        with count_forwards(net, 2, "x") as bar:
            net(torch.zeros(1, 2))
    assert isinstance(bar, LineProgress) and bar.n == 1
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["x: 1/2 NFE (50 %)"]
    assert sys.stderr.getvalue() == ""


def test_eval_shows_sampling_features_and_nll_bars_on_a_terminal(young_ema_ckpt, tmp_path, weights_dir, monkeypatch):  # noqa: F811
    tty = FakeTTY()
    monkeypatch.setattr("sys.stderr", tty)
    args = [
        "metrics=[fid,nll]",
        "nll_images=2",
        "batch_size=2",
        "num_samples=4",
        "num_real=4",
        "sampler=ddim",
        "sampler.steps=2",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    evaluate(compose_config([f"ckpt={young_ema_ckpt}", *args], tmp_path / "run", "eval"))
    shown = tty.getvalue()
    assert "sampling for metrics" in shown and "real-image features" in shown and "NLL" in shown
    monkeypatch.setattr("sys.stderr", tty := FakeTTY())
    evaluate(compose_config([f"ckpt={young_ema_ckpt}", *args, "progress=false"], tmp_path / "run2", "eval"))
    assert "sampling" not in tty.getvalue()


# ---------------------------------------------------------------- 4. outputs where asked, caches in the user's cache
def test_sample_with_out_dir_creates_no_run_dir_and_no_bars_in_logs(young_ema_ckpt, tmp_path):
    out = tmp_path / "wanted"
    proc = cli_ok(
        run_cli(
            "sample.py",
            f"ckpt={young_ema_ckpt}",
            "sampler=ddim",
            "sampler.steps=2",
            "num_samples=2",
            f"out_dir={out}",
            cwd=tmp_path,
        )
    )
    assert (out / "samples.png").is_file() and (out / ".hydra" / "config.yaml").is_file()
    assert not (tmp_path / "logs").exists()  # nothing under ./logs/sample/runs/...
    # not a TTY: no bar (carriage returns) in the log, progress as plain lines instead
    assert "%|" not in proc.stderr and "\r" not in proc.stdout + proc.stderr
    assert "sampling: 2/2 step (100 %)" in proc.stdout


def test_training_off_a_terminal_logs_progress_lines_instead_of_a_bar(tmp_path, caplog):
    """`make train > log` or SLURM: no Lightning bar, a line every callbacks.progress_lines.every_n_seconds."""
    import logging

    from difflab.tasks.train import train
    from tests.conftest import TINY

    run = [*TINY, "trainer.max_steps=3", "trainer.limit_train_batches=3", "trainer.enable_progress_bar=true"]
    run += ["callbacks.progress_lines.every_n_seconds=0.000001", "samples.num_samples=0"]
    with caplog.at_level(logging.INFO, logger="difflab.progress"):
        train(compose_config(run, tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == "difflab.progress"]
    assert lines[0].startswith("training: 1/3 step (33 %), ") and "ETA" in lines[0] and "epoch 0" in lines[0]
    assert lines[-1].startswith("training: 3/3 step (100 %)") and "train/loss" in lines[-1]
    caplog.clear()
    resumed = [*run, "trainer.max_steps=5", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"]
    with caplog.at_level(logging.INFO, logger="difflab.progress"):  # this run's 2 steps, and where the run is
        train(compose_config(resumed, tmp_path / "resumed"))
    lines = [r.getMessage() for r in caplog.records if r.name == "difflab.progress"]
    assert lines[-1].startswith("training: 2/2 step (100 %)") and "global step 5/5, epoch" in lines[-1]


def test_a_progress_line_says_done_total_rate_and_eta():
    assert progress_line("sampling", 120, 250, "step", 60.0, "NFE 20/20") == (
        "sampling: 120/250 step (48 %), 2 step/s, ETA 1 min 5 s, NFE 20/20"
    )
    assert progress_line("real features", 3, None, "batch", 1.5) == "real features: 3 batch, 2 batch/s"


def test_eval_writes_only_its_report_with_the_config(young_ema_ckpt, tmp_path):
    out = tmp_path / "results" / "nll.json"
    proc = cli_ok(run_cli("eval.py", f"ckpt={young_ema_ckpt}", *EVAL, f"out={out}", cwd=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no logs/eval/runs/..., no .hydra, no eval.log
    assert [p.name for p in out.parent.iterdir()] == ["nll.json"]
    report = json.loads(out.read_text())
    assert report["config"]["ckpt"] == str(young_ema_ckpt) and report["config"]["nll_images"] == 2
    assert report["classifier_ckpt"] is None and report["classifier_scale"] is None
    assert "nll_total_bpd" in proc.stdout


def test_user_cache_dir_follows_xdg_and_difflab_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFLAB_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert user_cache_dir("fid_stats") == user_cache_dir().expanduser() / "fid_stats"
    assert str(user_cache_dir()).endswith(os.path.join(".cache", "difflab"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir("fid_stats") == tmp_path / "xdg" / "difflab" / "fid_stats"
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "mine"))
    assert user_cache_dir("fid_stats") == tmp_path / "mine" / "fid_stats"
    cfg = compose_config(["ckpt=x"], tmp_path / "run", "eval")
    assert cfg.cache_dir == str(tmp_path / "mine" / "fid_stats")
    cfg = compose_config([*TINY, "callbacks=[default,generative_metrics]"], tmp_path / "run")
    assert cfg.callbacks.generative_metrics.cache_dir == str(tmp_path / "mine" / "fid_stats")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "DPMSolverSDESampler"),  # sample.py's default: the fast sampler of issue 27's study
        (["samples.sampler.steps=7"], "DPMSolverSDESampler"),
        (["samples.sampler=null"], "AncestralSampler"),  # the model's own (`sampler`)
        (["model=rectified_flow"], "FlowEulerSampler"),  # a flow draws with its own
    ],
)
def test_samples_after_fit_use_the_fast_sampler(overrides, expected, tiny_cfg):
    """Issue 28, point 6: the end-of-training grid is drawn with sample.py's default sampler (20 NFE), not the
    training sampler (250 ancestral steps in the quickstart)."""
    from hydra.utils import instantiate

    from difflab.tasks.train import final_sampler

    cfg = tiny_cfg(*overrides)
    module = instantiate(cfg.model)
    sampler = final_sampler(module, cfg) or module.sampler
    assert type(sampler).__name__ == expected
    if overrides == ["samples.sampler.steps=7"]:
        assert sampler.num_evaluations(None) == 7


def test_the_terminal_bar_shows_no_negative_epoch_nor_v_num_and_counts_to_its_total(tmp_path):
    """Issue 28, point 12: Lightning's bar said "Epoch 0/-2" (max_epochs is -1 in a step-limited run), showed
    v_num, and "260/59" after a mid-epoch resume (total = steps left, count = batch index in the epoch)."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.loggers import CSVLogger

    from difflab.callbacks.progress import step_progress_bar

    bar = step_progress_bar()
    trainer = pl.Trainer(
        max_steps=5, logger=CSVLogger(tmp_path), callbacks=[bar], limit_val_batches=0, enable_model_summary=False
    )
    trainer.fit(BoringModel())  # 64 batches per epoch, stopped after 5
    assert bar._get_train_description(0) == "Epoch 0"
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)
    assert bar.total_train_batches == 5  # the batches this epoch gets: 5 of 64, as counted


def test_the_model_summary_shows_the_networks_flops_not_zero(tmp_path, capsys):
    """Issue 28, point 12: Lightning's summary said "Total FLOPs: 0" (it counts only through an example input);
    difflab's shows the network's FLOPs per forward of one image (2 × Gflops) and "-" per layer."""
    import lightning.pytorch as pl
    from lightning.pytorch.demos.boring_classes import BoringModel

    from difflab.callbacks.progress import model_summary

    trainer = pl.Trainer(
        max_steps=1,
        logger=False,
        callbacks=[model_summary(0.5)],
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_checkpointing=False,  # else a checkpoints/ folder in the directory the suite runs from
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    out = capsys.readouterr().out
    assert "Total FLOPs: 1.0 B" in out and "Total FLOPs: 0" not in out

"""Issue 22, point 9: no library noise in a run's log (Lightning's LitLogger tip, wandb's "anonymous" warning,
WeightAveraging's sharding warning), and ``--help`` lists the config groups with the README's descriptions."""

from __future__ import annotations

import pytest

from difflab.utils.help import config_groups_help
from tests.conftest import TINY, cli_ok, compose_config, run_cli

NOISE = (
    "litlogger",
    "The anonymous setting has no effect",
    "WeightAveraging doesn't support sharding",
    "isinstance(treespec, LeafSpec)` is deprecated",  # torch to Lightning's _pytree, every run
)


def test_a_training_run_with_every_logger_prints_none_of_the_noise(tmp_path):
    proc = cli_ok(
        run_cli(
            "train.py",
            *TINY,
            "trainer.max_steps=1",
            "samples.num_samples=0",
            "logger=many_loggers",
            cwd=tmp_path,
            env={"WANDB_MODE": "offline", "WANDB_SILENT": "false"},
        )
    )
    output = proc.stdout + proc.stderr
    assert "wandb" in output  # wandb ran and spoke (its offline notice), so its warnings would be here
    for message in NOISE:
        assert message not in output, message


@pytest.mark.parametrize("script", ["train.py", "sample.py", "eval.py"])
def test_help_lists_groups_and_what_they_set(script, tmp_path):
    text = cli_ok(run_cli(script, "--help", cwd=tmp_path)).stdout
    assert "== Configuration groups (group=option) ==" in text, script
    assert "sampler: consistency, ddim, ddpm, dpmpp_2m" in text  # the options of the groups the script chooses from
    assert "the ODE/SDE solvers (sigma_schedule" in text  # the README's description of a group
    # only its own groups: sample.py and eval.py train nothing (Hydra listed every group, data= and net= too)
    listed_net = "\nnet: unet_s, unet_m" in text  # the README row of the net group
    assert ("DiffusionModule: parameterization (eps/x0/v)" in text) == listed_net == (script == "train.py")
    if script == "sample.py":
        assert "inpaint, img2img, cascade" in " ".join(text.split())  # its modes
    assert f"Usage: python src/{script}" in text
    assert not (tmp_path / "logs").exists()  # --help runs nothing


def test_config_groups_help_renders_the_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n## Configuration groups (`conf/`)\n\nintro\n\n| group | options | notes |\n|---|---|---|\n"
        "| `net` | `unet_s` | width `model_channels`; `${data}` \\| more |\n\n"
        "Top-level keys: `seed`.\n\n## Next\nnot this\n"
    )
    text = config_groups_help(readme=readme)
    assert text.splitlines()[0] == "net: unet_s"
    assert "width model_channels; $${data} | more" in text  # $ doubled for Hydra's string.Template
    assert "Top-level keys: seed." in text and "not this" not in text and "intro" not in text
    assert "README.md" in config_groups_help(readme=tmp_path / "missing.md")


@pytest.mark.parametrize("config_name", ["train", "eval"])
def test_alembic_info_lines_are_silenced(config_name, tmp_path):
    """Issue 28, point 12: Optuna's sqlite storage made alembic log its migrations at INFO in every sweep."""
    import logging
    import logging.config

    from omegaconf import OmegaConf

    cfg = compose_config(["ckpt=x"] if config_name == "eval" else [], tmp_path, config_name, keep_hydra=True)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        for node in ("hydra_logging", "job_logging"):  # configured as Hydra does
            logging.config.dictConfig(OmegaConf.to_container(cfg.hydra[node], resolve=True))
            assert not logging.getLogger("alembic.runtime.migration").isEnabledFor(logging.INFO)
            assert logging.getLogger("alembic.runtime.migration").isEnabledFor(logging.WARNING)
    finally:
        root.handlers[:], root.level = handlers, level
        logging.getLogger("alembic").setLevel(logging.NOTSET)

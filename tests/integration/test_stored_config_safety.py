"""A checkpoint that opens with weights_only can still carry code in its run config: ``instantiate`` calls whatever
``_target_`` names. Every route that builds objects from a stored config refuses a ``_target_`` difflab never writes
there (and an interpolation), naming the key path, before anything of it runs; ``trust_checkpoint=true`` lifts it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from difflab.modules import load_module
from difflab.tasks.eval import evaluate
from difflab.tasks.export import export
from difflab.tasks.sample import sample
from difflab.tasks.train import train
from difflab.utils.checkpoint_io import UnsafeCheckpointError, load_checkpoint, trusted_checkpoints
from difflab.utils.stored_config import check_stored_config
from tests.conftest import TINY, compose_config
from tests.integration.test_flow import CONDITIONAL, REFLOW

UNCONDITIONAL_REFLOW = [o for o in REFLOW if o not in CONDITIONAL]  # the tiny checkpoint has no classes


def payload(marker: Path) -> dict:
    """What an attacker's config would hold: built by ``instantiate`` (Hydra's own blocklist lets it through), it
    writes ``marker``; a shell command or a second ``torch.load`` would do worse."""
    path = {"_target_": "pathlib.Path", "_args_": [str(marker)]}
    return {"_target_": "pathlib.Path.write_text", "_args_": [path, "code from the config ran"]}


@pytest.fixture
def crafted(tiny_checkpoint, tmp_path):
    """Factory: the session's tiny checkpoint with ``content`` at ``config.model.loss`` (default: the payload), and
    the file the payload would create."""

    def make(content: dict | None = None, where: tuple[str, ...] = ("model", "loss")) -> tuple[Path, Path]:
        marker = tmp_path / "pwned"
        checkpoint = torch.load(tiny_checkpoint, weights_only=True)
        node = checkpoint["difflab"]["config"]
        for key in where[:-1]:
            node = node[key]
        node[where[-1]] = payload(marker) if content is None else content
        path = tmp_path / "crafted.ckpt"
        torch.save(checkpoint, path)
        return path, marker

    return make


def refused(marker: Path, call, key: str) -> str:
    """The UnsafeCheckpointError ``call`` raises (through Hydra's wrapper too), starting with ``key=``."""
    with pytest.raises(Exception) as info:
        call()
    assert not marker.exists(), "the payload ran"
    error = info.value
    while not isinstance(error, UnsafeCheckpointError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, UnsafeCheckpointError), info.value
    message = str(error)
    assert message.startswith(f"{key}=") and "trust_checkpoint=true" in message, message
    return message


def test_the_message_names_the_key_path_and_the_target(crafted):
    path, marker = crafted()
    message = refused(marker, lambda: load_module(path), "ckpt")
    assert "difflab.config.model.loss._target_ = 'pathlib.Path.write_text'" in message


def test_the_payload_is_live_without_the_check(crafted, tmp_path):
    """The route is real: with trust_checkpoint=true the same file builds the payload (so the refusal is what
    stops it, not an accident of the config)."""
    path, marker = crafted()
    cfg = compose_config([f"ckpt={path}", "num_samples=2", "trust_checkpoint=true"], tmp_path / "out", "sample")
    with pytest.raises(Exception):  # noqa: B017  (the module rejects an exec result as its loss; the code ran first)
        sample(cfg)
    assert marker.read_text() == "code from the config ran"


@pytest.mark.parametrize(
    "route",
    ["sample", "eval", "export", "classifier_ckpt", "upscaler_ckpt", "teacher_ckpt", "autoencoder_ckpt"],
)
def test_every_route_refuses_a_config_payload(route, crafted, tiny_checkpoint, tmp_path):
    path, marker = crafted()
    out = tmp_path / "out"
    calls = {
        "sample": ("ckpt", lambda: sample(compose_config([f"ckpt={path}", "num_samples=2"], out, "sample"))),
        "eval": ("ckpt", lambda: evaluate(compose_config([f"ckpt={path}", "metrics=[nll]"], out, "eval"))),
        "export": ("ckpt", lambda: export(compose_config([f"ckpt={path}", f"out={out}"], out, "export"))),
        "classifier_ckpt": (
            "classifier_ckpt",
            lambda: sample(
                compose_config([f"ckpt={tiny_checkpoint}", f"+classifier_ckpt={path}", "num_samples=2"], out, "sample")
            ),
        ),
        "upscaler_ckpt": (
            "upscaler_ckpt",
            lambda: sample(
                compose_config(
                    [f"ckpt={tiny_checkpoint}", "mode=cascade", f"+upscaler_ckpt={path}", "num_samples=2"],
                    out,
                    "sample",
                )
            ),
        ),
        "teacher_ckpt": (
            "model.teacher_ckpt",
            lambda: train(compose_config([*UNCONDITIONAL_REFLOW, f"model.teacher_ckpt={path}"], out)),
        ),
        "autoencoder_ckpt": (
            "model.autoencoder_ckpt",
            lambda: train(compose_config([*TINY, "model=ldm", f"model.autoencoder_ckpt={path}", "debug=fast"], out)),
        ),
    }
    key, call = calls[route]
    refused(marker, call, key)


def test_a_second_torch_load_is_refused(crafted, tmp_path):
    """``torch.load(weights_only=False)`` of another file, reached through the config: not a class we write."""
    path, marker = crafted({"_target_": "torch.load", "f": str(tmp_path / "other.pt"), "weights_only": False})
    assert "'torch.load' is not a class difflab builds" in refused(marker, lambda: load_module(path), "ckpt")


def test_nested_targets_and_interpolations_are_refused(crafted):
    path, marker = crafted({"net": [{"_target_": "pathlib.Path.write_text"}]}, ("model", "extra"))
    assert "difflab.config.model.extra.net[0]._target_" in refused(marker, lambda: load_module(path), "ckpt")
    path, marker = crafted("${oc.env:HOME}", ("model", "name"))
    assert "difflab.config.model.name = '${oc.env:HOME}' is an interpolation" in refused(
        marker, lambda: load_module(path), "ckpt"
    )


def test_a_payload_in_the_data_section_is_refused_where_data_is_built(crafted, tmp_path):
    path, marker = crafted(where=("data",))
    cfg = compose_config([f"ckpt={path}", "metrics=[nll]"], tmp_path / "out", "eval")
    assert "difflab.config.data._target_" in refused(marker, lambda: evaluate(cfg), "ckpt")


def test_only_what_is_built_is_checked(crafted, tmp_path):
    """A run config with a callback of the user's own (never built by sample.py) still samples without the opt-in;
    the same target in the model needs trust_checkpoint=true."""
    path, _ = crafted({"_target_": "mypackage.MyCallback"}, ("callbacks", "mine"))
    result = sample(compose_config([f"ckpt={path}", "num_samples=2"], tmp_path / "out", "sample"))
    assert result["npz"].is_file()


def test_trust_checkpoint_lifts_the_check(crafted):
    path, _ = crafted({"_target_": "torch.load"}, ("model", "extra"))
    with trusted_checkpoints(True):
        check_stored_config(load_checkpoint(path)["difflab"]["config"]["model"], "ckpt", "difflab.config.model")

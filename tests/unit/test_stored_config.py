"""The allow-list of ``_target_``s a stored config may name is exactly what difflab writes: every target in
``conf/`` is on it (or a checkpoint of ours would be refused), and every entry is a class or factory that exists."""

from __future__ import annotations

import re

import torch
from hydra.utils import get_object

from difflab.utils.stored_config import STORED_TARGETS, allowed_targets, unsafe_entries
from tests.conftest import CONF_DIR

# older run configs record these (the shipped kl-f4 stage 1 among them), conf/ no longer names them
LEGACY = {
    "lightning.pytorch.loggers.CSVLogger",
    "lightning.pytorch.loggers.TensorBoardLogger",
    "lightning.pytorch.callbacks.ModelCheckpoint",
}


def conf_targets() -> set[str]:
    found = set()
    for path in CONF_DIR.rglob("*.yaml"):
        found |= set(re.findall(r"_target_:\s*([\w.]+)", path.read_text()))
    return found


def test_every_target_in_conf_is_allowed_and_nothing_else_is_listed():
    targets = conf_targets() - {"difflab.utils.sweep_summary.SweepSummary"}  # a Hydra callback: never in a run config
    assert targets <= allowed_targets(), sorted(targets - allowed_targets())
    assert STORED_TARGETS - targets == LEGACY


def test_every_entry_exists():
    for target in STORED_TARGETS - {"difflab.networks.text_minilm.MiniLMConditioner"}:  # optional extra (text)
        assert callable(get_object(target)), target


def test_torch_optimizers_and_schedulers_are_allowed_other_torch_is_not():
    allowed = allowed_targets()
    assert {"torch.optim.Adam", "torch.optim.AdamW", "torch.optim.lr_scheduler.CosineAnnealingLR"} <= allowed
    assert not {"torch.load", "torch.save", "torch.optim.Optimizer.load_state_dict"} & allowed
    assert isinstance(get_object("torch.optim.lr_scheduler.LambdaLR"), type)


def test_unsafe_entries_walks_dicts_lists_and_skips_tensors():
    content = {
        "state_dict": {"w": torch.zeros(2)},
        "difflab": {
            "config": {"model": {"_target_": "difflab.modules.DiffusionModule", "nets": [{"_target_": "os.system"}]}}
        },
        "note": "plain $ text",
    }
    assert list(unsafe_entries(content)) == [
        ("difflab.config.model.nets[0]._target_", "'os.system' is not a class difflab builds from a file")
    ]
    assert list(unsafe_entries({"a": {"_target_": 3}})) == [
        ("a._target_", "3 is not a class difflab builds from a file")
    ]

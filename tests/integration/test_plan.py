"""train.py plan=true: the memory plan of DiT-XL/2 on 256² latents (32×32×4) under DDP and FSDP, built on the meta
device (no weights allocated, nothing trained)."""

from __future__ import annotations

import pytest

from difflab.tasks.train import train
from tests.conftest import compose_config

DIT_XL2 = [
    "model=ddpm",
    "net=dit_xl2",
    "model.image_shape=[4,32,32]",
    "model.num_classes=1000",
    "data.batch_size=32",
    "trainer.devices=8",
    "plan=true",
    "plan_device_gib=80",
]
GIB = 1024**3


def plan_of(tmp_path, *overrides: str) -> dict:
    return train(compose_config([*DIT_XL2, *overrides], tmp_path))["plan"]


def test_dit_xl2_plan_under_ddp_and_fsdp(tmp_path, capsys):
    ddp = plan_of(tmp_path, "trainer=ddp")
    fsdp = plan_of(tmp_path, "trainer=fsdp")
    checkpointed = plan_of(tmp_path, "trainer=fsdp", "net.checkpointing=true")
    # DiT-XL/2 of the paper has 675M parameters (its learned-Σ output layer has 8 channels; ours 4 here)
    assert ddp["trainable_parameters"] == fsdp["trainable_parameters"] == 674_816_272
    assert ddp["bytes"]["weights"] == 4 * 674_816_272  # fp32, whole on each of the 8 processes
    assert ddp["bytes"]["optimizer (Adam m, v)"] == 8 * 674_816_272
    assert fsdp["bytes"]["optimizer (Adam m, v)"] == pytest.approx(8 * 674_816_272 / 8)  # 1/8 per process
    assert fsdp["bytes"]["EMA"] == pytest.approx(4 * 674_816_272 / 8)
    # the same batch saves the same activations; checkpointing keeps only the blocks' inputs (> 10× less)
    assert fsdp["bytes"]["activations"] == ddp["bytes"]["activations"] > 10 * checkpointed["bytes"]["activations"]
    assert 5 * GIB < ddp["bytes"]["activations"] < 40 * GIB  # 32 images × 28 blocks × 256 tokens × 1152, bf16
    out = capsys.readouterr().out
    assert "Memory plan: FSDP over 8 process(es), batch 32 per process, activation checkpointing on" in out
    assert "fits in 80 GiB per device" in out
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


def test_plan_without_checkpointing_at_a_large_batch_does_not_fit(tmp_path, capsys):
    plan_of(tmp_path, "trainer=ddp", "data.batch_size=256")
    assert "does NOT fit in 80 GiB per device" in capsys.readouterr().out

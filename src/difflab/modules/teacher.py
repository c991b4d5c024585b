"""The teacher of a few-step model, and what every distilled or consistency checkpoint records about it.

A distilling module (progressive distillation, consistency distillation, latent consistency) holds its teacher as a
frozen :class:`DiffusionModule` loaded from ``model.teacher_ckpt`` with :func:`load_teacher`. The teacher is kept
out of the student's state dict (in a :class:`Shared` holder, not a submodule, which the EMA callback's copy of the
module shares instead of duplicating): checkpoints hold the student only, and a
checkpoint rebuilds without the teacher's file (``load_module`` nulls ``teacher_ckpt``), so ``sample.py`` needs the
student's checkpoint alone.

Every checkpoint of such a module carries ``checkpoint["distillation"]`` (:class:`FewStepRecord`): the method, the
teacher (its path, the SHA-256 of the weights used and its training step; none for consistency training, which has
no teacher) and the number of sampling steps the model was trained for. ``sample.py`` draws with the checkpoint's
own sampler at that step count unless the command line chooses a sampler (:attr:`FewStepMixin.own_sampler`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from difflab.modules.checkpoint import load_module
from difflab.modules.diffusion import DiffusionModule
from difflab.utils.hashing import state_dict_sha256

log = logging.getLogger(__name__)

RECORD_KEY = "distillation"


def load_teacher(path: str | Path, key: str = "model.teacher_ckpt") -> tuple[DiffusionModule, dict[str, Any]]:
    """The teacher at ``path`` (its EMA weights, its own sampler config), frozen and in eval mode, on the CPU, and
    its record: ``ckpt`` (the resolved path), ``sha256`` (:func:`state_dict_sha256` of its network: the weights
    used, whatever file they came from), ``global_step``, ``model`` (its module class) and ``config`` (its run's
    ``model`` config, for students that take its schedule)."""
    teacher, record = load_module(path, key=key)
    teacher.requires_grad_(False).eval()
    info = {
        "ckpt": str(Path(path).resolve()),
        "sha256": state_dict_sha256(teacher.net),
        "global_step": int(record.get("global_step", 0)),
        "model": str(record["config"]["model"].get("_target_", "")),
    }
    log.info(
        "%s=%s: teacher %s at step %d, weights sha256 %s", key, path, info["model"], info["global_step"], info["sha256"]
    )
    return teacher, {**info, "config": record["config"]["model"]}


class Shared:
    """A reference that copies of a module share: ``copy.deepcopy`` returns the holder itself. The EMA callback
    deep-copies the whole LightningModule for its averaged model; a teacher (or a target network) held here is then
    neither duplicated in memory nor part of the average."""

    __slots__ = ("value",)

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict) -> Shared:
        return self


class FewStepMixin:
    """For the LightningModules of few-step models (mixed in before :class:`DiffusionModule`).

    ``self.teacher``: the frozen teacher or None (consistency training; a checkpoint rebuilt for sampling); it is
    not a submodule, so it follows the student's device in ``on_fit_start`` / ``setup``. ``few_step_method`` names the
    method; ``trained_steps()`` is the step count the model was trained to sample with. ``own_sampler``: sample.py
    draws with the checkpoint's own sampler unless the command line names one.
    """

    own_sampler = True
    few_step_method = "few_step"

    @property
    def teacher(self) -> DiffusionModule | None:
        """The frozen teacher, or None (held in a :class:`Shared`: not a submodule, not copied with the module)."""
        holder = self.__dict__.get("_teacher")
        return None if holder is None else holder.value

    def attach_teacher(self, teacher_ckpt: str | None, key: str = "model.teacher_ckpt") -> None:
        """Load the teacher from ``teacher_ckpt`` (None: no teacher) into ``self.teacher`` and its record."""
        self._teacher = Shared()
        self.teacher_record: dict[str, Any] | None = None
        if teacher_ckpt:
            teacher, info = load_teacher(teacher_ckpt, key)
            self._teacher.value = teacher
            self.teacher_record = {k: v for k, v in info.items() if k != "config"}
            self.teacher_config = info["config"]

    def teacher_to_device(self) -> None:
        """Move the teacher to the student's device (Lightning moves submodules only)."""
        teacher = self.teacher
        if teacher is not None:
            teacher.to(self.device)

    def on_fit_start(self) -> None:
        self.teacher_to_device()

    def trained_steps(self) -> int:
        """The number of sampling steps this model was trained for (its sampler's default)."""
        return int(self.sampler.num_steps)

    def few_step_record(self) -> dict[str, Any]:
        """What ``checkpoint["distillation"]`` holds: method, teacher record (or None), sampling steps."""
        return {"method": self.few_step_method, "teacher": self.teacher_record, "steps": self.trained_steps()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        checkpoint[RECORD_KEY] = self.few_step_record()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        recorded = checkpoint.get(RECORD_KEY)
        if recorded and self.teacher_record is None:  # rebuilt for sampling or resumed: keep the recorded teacher
            self.teacher_record = recorded.get("teacher")


def teacher_forward(
    teacher: DiffusionModule, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
) -> torch.Tensor:
    """The teacher's raw network output at (x_t, t) with condition ``y``, without gradients."""
    with torch.no_grad():
        return teacher(x_t, t, y if teacher.num_classes else None)

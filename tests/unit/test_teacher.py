"""The few-step teacher contract (difflab.modules.teacher): held outside the state dict, shared (not duplicated) by
copies of the module such as the EMA callback's averaged model, recorded in checkpoints."""

from __future__ import annotations

import copy

import torch

from difflab.modules import DiffusionModule
from difflab.modules.teacher import RECORD_KEY, FewStepMixin, Shared
from tests.conftest import tiny_diffusion_module


def test_a_shared_reference_survives_deepcopy_as_itself():
    value = torch.nn.Linear(2, 2)
    holder = Shared(value)
    copied = copy.deepcopy({"holder": holder, "other": [holder]})
    assert copied["holder"] is holder and copied["other"][0] is holder and copied["holder"].value is value


class _Student(FewStepMixin, DiffusionModule):
    few_step_method = "test"


def _student_with_teacher():
    student = tiny_diffusion_module()
    student.__class__ = _Student  # the tiny module as a few-step student, without a teacher checkpoint
    student.attach_teacher(None)
    teacher = tiny_diffusion_module().requires_grad_(False)
    student._teacher.value = teacher
    student.teacher_record = {"ckpt": "teacher.ckpt", "sha256": "0" * 64, "global_step": 7, "model": "x"}
    return student, teacher


def test_the_teacher_is_no_submodule_and_copies_share_it():
    student, teacher = _student_with_teacher()
    assert student.teacher is teacher
    assert not any(k.startswith(("teacher", "_teacher")) for k in student.state_dict())
    averaged = copy.deepcopy(student)  # what the EMA callback's AveragedModel does with the module
    assert averaged.teacher is teacher  # shared: not a second copy in memory, not averaged
    assert averaged.net is not student.net


def test_checkpoints_record_the_teacher_and_the_trained_steps():
    student, _ = _student_with_teacher()
    checkpoint: dict = {}
    student.on_save_checkpoint(checkpoint)
    record = checkpoint[RECORD_KEY]
    assert record == {"method": "test", "teacher": student.teacher_record, "steps": student.sampler.num_steps}
    rebuilt = tiny_diffusion_module()
    rebuilt.__class__ = _Student
    rebuilt.attach_teacher(None)  # as load_module rebuilds it for sampling: no teacher file needed
    rebuilt.on_load_checkpoint(checkpoint)
    assert rebuilt.teacher is None and rebuilt.teacher_record == student.teacher_record

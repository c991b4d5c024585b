"""The non-finite guard: a diverging run stops with the step and the last finite checkpoint (stop) or drops the
bad steps (skip); a checkpoint with non-finite weights is never written over a finite one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difflab.callbacks import NonFiniteError, NonFiniteGuard
from difflab.tasks.train import train
from tests.conftest import TINY, bare_trainer, compose_config, tiny_diffusion_module

# lr = 1e6: the loss is 0.99 at step 0, ~2e5 at step 1, NaN from step 2 on (gradients NaN from step 2)
DIVERGING = [
    *TINY,
    "model.optimizer.lr=1e6",
    "model.lr_scheduler=null",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "samples.num_samples=0",
    "logger=csv",
    "trainer.max_steps=8",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "callbacks.model_checkpoint.every_n_epochs=null",
]


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def test_stop_names_the_step_and_leaves_the_last_finite_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError) as info:
        train(compose_config(DIVERGING, tmp_path))
    message = str(info.value)
    assert "at step 2" in message and "callbacks.nonfinite.action=skip" in message
    assert f"last.ckpt in {tmp_path / 'checkpoints'} (step 2)" in message
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # the update made with step 2's NaN gradients was never saved
    assert all_finite(last["state_dict"]) and all_finite(last["current_model_state"])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "step0000002.ckpt"]


def test_skip_drops_the_non_finite_steps_and_finishes_finite(tmp_path):
    with pytest.warns(UserWarning, match="non-finite steps were skipped"):
        result = train(compose_config([*DIVERGING, "callbacks.nonfinite.action=skip"], tmp_path))
    assert result["metrics"]["train/nonfinite_steps"] == 6  # steps 2..7
    last = torch.load(result["checkpoint"], weights_only=True)
    assert last["global_step"] == 8 and all_finite(last["state_dict"]) and all_finite(last["current_model_state"])
    assert all(all_finite(s) for s in last["optimizer_states"][0]["state"].values())  # Adam's moments too
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["status"] == "ok" and summary["nonfinite_steps_skipped"] == 6


@pytest.mark.parametrize("fused", [True, False])
def test_skip_leaves_weights_and_optimizer_state_as_they_were(fused):
    """A dropped step changes nothing: not the weights, not Adam's moments or step count (fused optimizers skip
    through their found_inf input without a host sync; others lose the gradients)."""
    module = tiny_diffusion_module(optimizer=lambda params: torch.optim.Adam(params, lr=1e-3, fused=fused))
    guard = NonFiniteGuard("skip")
    trainer = bare_trainer(max_steps=1, callbacks=[guard])
    guard.on_train_start(trainer, module)
    optimizer = module._optimizer(module.parameters())
    params = list(module.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()  # one finite step: Adam's state exists
    before = [p.detach().clone() for p in params], {k: v.clone() for k, v in optimizer.state[params[0]].items()}
    params[0].grad = torch.full_like(params[0], math.nan)
    guard.on_before_optimizer_step(trainer, module, optimizer)
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before[0], strict=True))
    assert all(torch.equal(optimizer.state[params[0]][k], v) for k, v in before[1].items())
    assert int(guard._count) == 1 and int(guard._first) == 0


def test_a_checkpoint_with_non_finite_weights_is_refused_before_it_is_written(tmp_path):
    module = tiny_diffusion_module()
    guard = NonFiniteGuard("skip")
    trainer = bare_trainer(max_steps=1, callbacks=[guard])
    state = module.state_dict()
    next(iter(state.values())).fill_(math.inf)
    with pytest.raises(NonFiniteError, match="weights \\(state_dict\\) are not all finite; the checkpoint was not"):
        guard.on_save_checkpoint(trainer, module, {"state_dict": state})


def test_skip_records_the_count_and_a_non_finite_validation_is_not_ok(tmp_path):
    """18 of 20 steps skipped and val/loss = NaN used to end with rc 0 and "status": "ok": the count is recorded in
    run_summary.json, the run ends with an error and its summary says nonfinite."""
    validated = [o for o in DIVERGING if not o.startswith("trainer.limit_val_batches")]
    validated += ["trainer.limit_val_batches=1", "trainer.val_check_interval=4", "trainer.check_val_every_n_epoch=null"]
    with pytest.raises(NonFiniteError, match=r"the last validation is not finite \(val/loss=nan\) after 8 steps, 6 of"):
        train(compose_config([*validated, "callbacks.nonfinite.action=skip"], tmp_path))
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert summary["status"] == "nonfinite" and summary["nonfinite_steps_skipped"] == 6
    assert "the model is not usable" in summary["error"] and summary["metrics"]["val/loss"] is None  # NaN → null

"""A guard against non-finite training: no silent NaN run, no NaN checkpoint over a finite one."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.tensor import DTensor

from difflab.strategies.fsdp import is_sharded_strategy
from difflab.utils.enums import StrEnumChoice, parse_enum


class NonFiniteAction(StrEnumChoice):
    STOP = "stop"  # stop training with an error (at the next logging step or checkpoint)
    SKIP = "skip"  # drop the step (no weight or optimizer-state update), as AMP's GradScaler does, and go on


class NonFiniteError(RuntimeError):
    """Training produced non-finite gradients or weights."""


class NonFiniteGuard(pl.Callback):
    """Watches every optimizer step for non-finite gradients without a host-device synchronisation per step.

    Each step, ``on_before_optimizer_step`` reduces the gradients to one flag on the device (one fused norm over all
    of them; under DDP after their all-reduce, so every rank sees the same flag) and adds it to a device counter.
    The counter is read back only where the host waits anyway: at logging steps (every
    ``trainer.log_every_n_steps``, where Lightning reads the loss) and before every checkpoint is written.

    ``action=stop``: at the first such read after a non-finite step, training stops with :class:`NonFiniteError`
    naming the step and the last checkpoint written (every checkpoint passes this guard, so that one is finite).
    ``action=skip``: the step is dropped, as AMP's GradScaler does — sync-free through the ``found_inf`` input of
    fused optimizers (the default ``model.optimizer.fused=true``); other optimizers read the flag each step (one
    sync) and drop the gradients — and the count is logged as ``train/nonfinite_steps``. Under ``16-mixed`` the
    GradScaler itself skips overflowing steps; the guard then checks only the weights. In either mode a checkpoint
    whose weights are not all finite is never written: the save fails and the previous file stays as it was.
    """

    def __init__(self, action: str | NonFiniteAction = NonFiniteAction.STOP) -> None:
        self.action = parse_enum(NonFiniteAction, action, "callbacks.nonfinite.action")
        self._count: torch.Tensor | None = None  # non-finite steps so far (device)
        self._first: torch.Tensor | None = None  # global step of the first one, -1: none (device)
        self._step: torch.Tensor | None = None  # optimizer steps, a device copy of trainer.global_step
        self._check_gradients = True
        self._last_saved: int | None = None  # global step of the last checkpoint this guard let through

    @property
    def skipped_steps(self) -> int:
        """Non-finite steps found so far (dropped under ``action=skip``); a host read."""
        return 0 if self._count is None else int(self._count)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        device = pl_module.device
        self._count = torch.zeros((), dtype=torch.long, device=device)
        self._first = torch.full((), -1, dtype=torch.long, device=device)
        self._step = torch.full((), trainer.global_step, dtype=torch.long, device=device)
        plugin = trainer.precision_plugin
        self._check_gradients = not (isinstance(plugin, MixedPrecision) and plugin.scaler is not None)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self._check_gradients or self._step is None:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        found = _any_nonfinite(grads) if grads else torch.zeros((), dtype=torch.bool, device=self._step.device)
        if is_sharded_strategy(trainer.strategy):  # each process saw its shards: decide together (skip, stop)
            found = trainer.strategy.reduce(found.float(), reduce_op="max") > 0
        # the step as the loggers number it (the loss of this batch is logged at global_step before the update)
        self._first = torch.where(found & (self._first < 0), self._step, self._first)
        self._count += found
        self._step += 1
        if self.action is NonFiniteAction.SKIP:
            _skip_step_if(optimizer, found)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._count is None:
            return
        if self.action is NonFiniteAction.SKIP:  # read back by Lightning at its logging steps only
            pl_module.log("train/nonfinite_steps", self._count.float(), on_step=True, on_epoch=False)
        elif trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._stop_if_found(trainer, "at a logging step")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._count is None:
            return
        if self.action is NonFiniteAction.STOP:
            self._stop_if_found(trainer, "at the end of training")
        elif int(self._count):
            rank_zero_warn(
                f"callbacks.nonfinite.action=skip: {int(self._count)} non-finite steps were skipped "
                f"(the first at step {int(self._first)})"
            )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # before Lightning writes the file: raising here leaves the previous checkpoint untouched
        if self._count is not None and self.action is NonFiniteAction.STOP:
            self._stop_if_found(trainer, "before writing a checkpoint")
        finite = torch.tensor([_all_finite(checkpoint.get(k)) for k in ("state_dict", "current_model_state")])
        if is_sharded_strategy(trainer.strategy):  # each process checked its shards: all raise, or none
            finite = trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
        bad = [key for key, ok in zip(("state_dict", "current_model_state"), finite.tolist(), strict=True) if not ok]
        if bad:
            raise NonFiniteError(
                f"step {trainer.global_step}: the weights ({', '.join(bad)}) are not all finite; the checkpoint "
                f"was not written. {self._last_checkpoint(trainer)}"
            )
        self._last_saved = trainer.global_step

    def _stop_if_found(self, trainer: pl.Trainer, where: str) -> None:
        first = int(self._first)  # the one host read: at logging steps, before saves, at the end
        if first < 0:
            return
        raise NonFiniteError(
            f"non-finite gradients (loss) at step {first} (noticed {where}, step {trainer.global_step}); training "
            f"stopped (callbacks.nonfinite.action=stop). {self._last_checkpoint(trainer)} Lower the learning rate "
            "(model.optimizer.lr), clip gradients (trainer.gradient_clip_val), or drop such steps with "
            "callbacks.nonfinite.action=skip."
        )

    def _last_checkpoint(self, trainer: pl.Trainer) -> str:
        """Where the last finite checkpoint is (every checkpoint written passed this guard)."""
        callback = trainer.checkpoint_callback
        if self._last_saved is not None and callback is not None:
            name = "last.ckpt" if getattr(callback, "save_last", False) else "the newest file"
            return f"The last finite checkpoint is {name} in {callback.dirpath} (step {self._last_saved})."
        if trainer.ckpt_path:
            return f"No checkpoint was written since the one this run resumed from, {trainer.ckpt_path}."
        return "No checkpoint was written before."


def _any_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor on the first tensor's device: whether any element is NaN or ±inf (no host sync when all
    are on one device). An overflowing norm (elements beyond ~1e19) counts as non-finite too."""
    devices: dict[torch.device, list[torch.Tensor]] = {}
    for t in (t.to_local() if isinstance(t, DTensor) else t for t in tensors):  # sharded: this process's shards
        devices.setdefault(t.device, []).append(t)
    home = next(iter(devices))
    flags = []
    for group in devices.values():
        norms = torch._foreach_norm(group)  # one fused kernel per dtype; NaN/inf propagate into the norms
        flags.append((~torch.stack([n.float() for n in norms]).isfinite().all()).to(home))
    return torch.stack(flags).any() if len(flags) > 1 else flags[0]


def _all_finite(state: dict[str, torch.Tensor] | None) -> bool:
    floats = [t for t in (state or {}).values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return not floats or not bool(_any_nonfinite(floats))


def _skip_step_if(optimizer: Any, found: torch.Tensor) -> None:
    """Make ``optimizer.step()`` leave weights and state untouched when ``found``."""
    inner = getattr(optimizer, "optimizer", optimizer)  # through LightningOptimizer
    if getattr(inner, "_step_supports_amp_scaling", False):  # fused: the kernel skips the step on found_inf, no sync
        inner.grad_scale, inner.found_inf = None, found.float()
    elif bool(found):  # one sync per step: optimizers skip parameters without a gradient
        for group in inner.param_groups:
            for p in group["params"]:
                p.grad = None

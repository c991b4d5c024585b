"""EMA of the weights: Lightning's ``WeightAveraging`` with a fused, sync-free update and an optional decay warm-up.

Why not Lightning's ``EMAWeightAveraging`` as it is (our default until this callback): its update goes through
``torch.optim.swa_utils.AveragedModel.update_parameters``, which

1. updates tensor by tensor through ``get_ema_avg_fn``: for ``unet_m`` (304 parameter tensors) that is ~2,400
   operators — on a GPU ~2,400 kernel launches — after every optimizer step;
2. reads its step counter back to the host twice per update (``bool(n_averaged == 0)``, ``if n_averaged > 0``),
   a host-device synchronisation that drains the launch queue every training step.

This subclass keeps everything else of ``WeightAveraging`` — the swap for validation, the copy into the model at
the end of fit, the checkpoint layout (EMA weights in ``state_dict``, raw ones in ``current_model_state``, the
``AveragedModel``'s ``n_averaged`` in ``averaging_state``), so checkpoints of either callback load with the other —
and replaces only the update: a host-side counter and one ``torch._foreach_lerp_`` over all tensors,
θ_ema ← θ_ema + (1 − decay)(θ − θ_ema) = decay θ_ema + (1 − decay) θ (the same formula).

``warmup=True`` uses decay_n = min(decay, (1 + n)/(10 + n)) at the n-th update (the warm-up of diffusers' and
TensorFlow's EMA), so an EMA with decay 0.9999 follows the weights in a short run instead of keeping most of the
random initialisation (0.9999^10,000 ≈ 37 % of it after 10k steps without warm-up).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import WeightAveraging

from difflab.callbacks.sharded_ema import ShardedAverage
from difflab.strategies.fsdp import is_sharded_strategy


def ema_decay_at(decay: float, warmup: bool, num_updates: int) -> float:
    """The decay of the update after ``num_updates`` earlier ones: min(decay, (1 + n)/(10 + n)) with warm-up."""
    return min(decay, (1 + num_updates) / (10 + num_updates)) if warmup else decay


def start_weight(decay: float, warmup: bool, num_updates: int) -> float:
    """How much of the first update's weights (a copy of the weights after one optimizer step: still the random
    start) the EMA holds after ``num_updates`` updates: ∏_{n=1}^{N-1} decay_n. Without warm-up that is
    decay^(N-1), e^-1 at N ≈ 1/(1 − decay); with warm-up it falls like (10/N)^9."""
    if num_updates <= 0:
        return 1.0
    log_weight = 0.0
    for n in range(1, num_updates):
        log_weight += math.log(ema_decay_at(decay, warmup, n))
        if log_weight < -50:  # negligible; stops the loop for long runs
            return 0.0
    return math.exp(log_weight)


def young_ema_warning(decay: float, warmup: bool, num_updates: int) -> str | None:
    """A warning when EMA weights are still mostly the random start (more than e^-1 of it, i.e. fewer than
    ~1/(1 − decay) updates without warm-up): samples from them look like noise while the raw weights may not."""
    weight = start_weight(decay, warmup, num_updates)
    if weight <= math.exp(-1):
        return None
    return (
        f"the EMA weights have seen {num_updates} updates at decay {decay}"
        f"{' with' if warmup else ' without'} warm-up: {weight:.0%} of them is still the random start, so samples "
        f"may look like noise. Sample the raw weights with `weights=raw`, train longer (~{math.ceil(1 / (1 - decay))}"
        " updates), or train with `callbacks.ema.warmup=true`."
    )


class EMA(WeightAveraging):
    """Exponential moving average of the module's weights, updated after every ``update_every_n_steps``-th step.

    Args:
        decay: the EMA decay in [0, 1).
        warmup: decay_n = min(decay, (1 + n)/(10 + n)) at the n-th update.
        use_buffers: average the floating-point buffers too (others are copied); ours are constants: false.
        update_every_n_steps: update after every n-th optimizer step (the decay applies per update).
        device: where the EMA copy lives (default: the module's device); e.g. ``cpu`` to save GPU memory.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        warmup: bool = False,
        use_buffers: bool = False,
        update_every_n_steps: int = 1,
        device: str | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay}: expected 0 <= decay < 1")
        if update_every_n_steps < 1:
            raise ValueError(f"callbacks.ema.update_every_n_steps={update_every_n_steps}: expected >= 1")
        super().__init__(device=device, use_buffers=use_buffers)
        self.decay, self.warmup, self.update_every_n_steps = float(decay), bool(warmup), update_every_n_steps
        self._num_updates = 0  # host copy of AveragedModel.n_averaged: reading that one would synchronise

    # trainer=fsdp: the EMA of this process's shards, built at first use in fit (once the module is sharded)
    _sharded: ShardedAverage | None = None
    _sharded_fit = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if is_sharded_strategy(getattr(trainer, "strategy", None)):  # no AveragedModel: sharded after this hook
            if self._device is not None:
                raise ValueError("callbacks.ema.device: not with trainer=fsdp (the EMA is sharded like the model)")
            self._sharded_fit = stage == "fit"
            return
        # WeightAveraging.setup calls configure_model before it copies the module; ours only compiles there
        # (model.compile), so it is held back here: the EMA copy stays eager (it is only averaged into and swapped
        # from, never run compiled), and the module compiles when Lightning calls configure_model itself, right
        # after the callbacks' setup. Its warning that it "doesn't support sharding model layers" is noise for us.
        pl_module.configure_model = lambda: None  # an instance attribute over the method, removed below
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="You're using the WeightAveraging callback with a model")
                super().setup(trainer, pl_module, stage)
        finally:
            del pl_module.configure_model

    def _shards(self, pl_module: pl.LightningModule) -> ShardedAverage | None:
        """The sharded EMA (trainer=fsdp, in fit), built from the sharded module at its first use; else None."""
        if self._sharded is None and self._sharded_fit:
            self._sharded = ShardedAverage(pl_module)
        return self._sharded

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (shards := self._shards(pl_module)) is not None:
            return shards.swap()
        super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (shards := self._shards(pl_module)) is not None:
            return shards.swap()
        super().on_validation_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (shards := self._shards(pl_module)) is not None:
            return shards.copy_to_model()
        super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if (shards := self._shards(pl_module)) is not None:
            return shards.save(checkpoint, self._num_updates)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    @property
    def num_updates(self) -> int:
        """EMA updates so far (the checkpoint's ``averaging_state["n_averaged"]``)."""
        return self._num_updates

    def decay_at(self, num_updates: int) -> float:
        """The decay of the update after ``num_updates`` earlier ones (the first update copies the weights)."""
        return ema_decay_at(self.decay, self.warmup, num_updates)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.update_every_n_steps == 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # WeightAveraging's own hook, with the update below instead of AveragedModel.update_parameters
        if trainer.global_step > self._latest_update_step and self.should_update(step_idx=trainer.global_step - 1):
            self.update(pl_module)
            self._latest_update_step = trainer.global_step

    @torch.no_grad()
    def update(self, pl_module: torch.nn.Module) -> None:
        """One EMA step of the averaged copy towards ``pl_module``'s current weights (no host-device sync)."""
        if (shards := self._shards(pl_module)) is not None:
            shards.update(1.0 - self.decay_at(self._num_updates), first=self._num_updates == 0)
            self._num_updates += 1
            return
        assert self._average_model is not None, "EMA.update outside fit"
        averaged, current = self._tensors(self._average_model.module), self._tensors(pl_module)
        pairs = [(a, c if c.device == a.device else c.to(a.device)) for a, c in zip(averaged, current, strict=True)]
        first = self._num_updates == 0  # the first update copies; afterwards only non-float buffers are copied
        lerp = [] if first else [(a, c) for a, c in pairs if a.is_floating_point()]
        copy = pairs if first else [(a, c) for a, c in pairs if not a.is_floating_point()]
        if lerp:
            torch._foreach_lerp_([a for a, _ in lerp], [c for _, c in lerp], 1.0 - self.decay_at(self._num_updates))
        if copy:
            torch._foreach_copy_([a for a, _ in copy], [c for _, c in copy])
        self._average_model.n_averaged += 1  # on the device, kept for the checkpoint layout; never read back
        self._num_updates += 1

    def _tensors(self, module: torch.nn.Module) -> list[torch.Tensor]:
        # the tensors themselves (updated in place under no_grad, as optimizers do): .detach() would add an
        # operator per tensor
        if not self._use_buffers:
            return list(module.parameters())
        return list(itertools.chain(module.parameters(), module.buffers()))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if (shards := self._shards(pl_module)) is not None:
            self._num_updates = shards.load(checkpoint)
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:  # once per resume: the host counter from the restored n_averaged
            self._num_updates = int(self._average_model.n_averaged)

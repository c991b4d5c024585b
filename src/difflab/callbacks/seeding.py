"""The random stream training draws from: one per DDP rank, carried by checkpoints, so that resuming is exact."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

CHECKPOINT_KEY = "training_random_state"


def capture_random_state(device: torch.device) -> dict[str, Any]:
    """The global generators' states (torch CPU, ``device``'s CUDA generator, numpy, Python) as tensors and plain
    containers, so that checkpoints holding them load with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": gauss},
        "python": [version, list(internal), gauss_next],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_random_state(state: dict[str, Any], device: torch.device) -> None:
    """Set the global generators to :func:`capture_random_state`'s ``state``."""
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    keys = np.asarray(numpy["keys"], dtype=np.uint32)
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class TrainingRandomState(pl.Callback):
    """Training steps draw (t, ε, label dropout, dropout masks, importance-sampled t, posterior samples) from their
    own per-rank stream of the global generators; checkpoints carry every rank's stream, and a resumed run continues
    it bit for bit.

    The stream is swapped in for each training step (``on_train_batch_start`` … ``on_train_batch_end``) and out
    again afterwards, so what runs between steps — validation, sample grids, FID's subsets, a ``DataLoader`` drawing
    its worker seeds — never moves it: resumed at step s, the run's step s + 1 sees the same random numbers as the
    uninterrupted run's, however either got there. (The data order is not drawn from it: see
    :mod:`difflab.data.order`.) Swapping costs two host-side copies of the generator states per step, no
    host-device synchronisation.

    A fresh run seeds rank r's stream from (seed, r): DDP ranks draw different t and ε for their different images.
    A checkpoint without the stream (written by an older difflab) or from another number of ranks resumes with a
    stream seeded from (seed, rank, global step) and a warning: reproducible, but not the uninterrupted run's.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._training: dict[str, Any] | None = None  # the stream between steps
        self._outside: dict[str, Any] | None = None  # the global state while a step runs
        self._restored: list[dict[str, Any]] | None = None
        self._device = torch.device("cpu")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._device = pl_module.device
        restored, self._restored = self._restored, None
        if restored is not None and len(restored) == trainer.world_size:
            self._training = restored[trainer.global_rank]
            return
        step = trainer.global_step
        if step:
            reason = (
                "has no random state (written by an older difflab)"
                if restored is None
                else (f"holds the random states of {len(restored)} ranks, this run has {trainer.world_size}")
            )
            rank_zero_warn(
                f"ckpt_path: the checkpoint {reason}; training continues from a fresh random stream "
                "seeded by (seed, rank, step): reproducible, but not bit-identical to an uninterrupted run"
            )
        outside = capture_random_state(self._device)
        seed = (self.seed + 1_000_003 * trainer.global_rank + 7_919 * step) % (2**32)
        pl.seed_everything(seed, workers=True, verbose=False)
        self._training = capture_random_state(self._device)
        restore_random_state(outside, self._device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._outside = capture_random_state(self._device)
        restore_random_state(self._training, self._device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._training = capture_random_state(self._device)
        restore_random_state(self._outside, self._device)
        self._outside = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # inside a step (a save on an exception) the stream is the global state itself
        current = capture_random_state(self._device) if self._outside is not None else self._training
        if current is None:  # saved outside fit
            return
        states = [current]
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:  # every rank saves (Lightning)
            states = [None] * trainer.world_size
            dist.all_gather_object(states, current)
        checkpoint[CHECKPOINT_KEY] = states

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._restored = checkpoint.get(CHECKPOINT_KEY)

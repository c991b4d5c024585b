"""The rounds of progressive distillation (Salimans & Ho 2022, Algorithm 2's outer loop) as a mixin of
:class:`~difflab.modules.progressive.ProgressiveDistillationModule`: which round an optimizer step trains in, the
round's grid and sampler steps, η ← θ between rounds (a frozen copy of the finished student becomes the teacher, fresh
optimizer state, restarted EMA), the round checkpoints and the learning rate's decay within a round.

Rounds are counted in optimizer steps: with ``guidance_steps`` = G (guidance distillation's stage one, round −1) and
``steps_per_round`` = S, step s trains in round −1 while s < G, then in round min(⌊(s − G)/S⌋, rounds − 1); round k
ends at step G + (k + 1) S.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging

from difflab.modules.progressive_math import round_grid

log = logging.getLogger(__name__)


class RoundsMixin:
    """Round bookkeeping (mixed in before :class:`FewStepMixin`); the module sets ``rounds``, ``start_steps``,
    ``steps_per_round``, ``guidance_steps``, ``round`` and ``_round_teacher`` (a :class:`Shared`)."""

    # ------------------------------------------------------------------ rounds (round −1: stage one)
    @property
    def first_round(self) -> int:
        """−1 with a stage one (``guidance_steps`` > 0), else 0."""
        return -1 if self.guidance_steps else 0

    def round_of(self, step: int) -> int:
        """The round that optimizer step ``step`` (0-based) trains in: −1 in stage one, then 0 … rounds − 1."""
        if step < self.guidance_steps:
            return -1
        return min((step - self.guidance_steps) // self.steps_per_round, self.rounds - 1)

    def round_end(self, round_index: int) -> int:
        """The global step at which round k (−1: stage one) ends."""
        return self.guidance_steps + (round_index + 1) * self.steps_per_round

    def student_steps(self, round_index: int | None = None) -> int:
        """N_k = start_steps / 2^(k+1): the student's DDIM steps in round k (default: the current round; stage one,
        k = −1: N_0)."""
        return self.start_steps // 2 ** ((self.round if round_index is None else round_index) + 1)

    def trained_steps(self) -> int:
        return self.student_steps()

    def use_round(self, round_index: int) -> None:
        """Make round k current: its grid (stage one: the N_0 grid itself), and the student's sampler at N_k steps."""
        self.round = round_index
        steps = self.student_steps()
        # the teacher's grid of 2N_k points; stage one's is the N_0 grid itself (the 2N grid at N = N_0/2)
        grid_steps = steps if round_index >= 0 else steps // 2
        self._grid_t, self._grid_ab = round_grid(self.diffusion.alphas_cumprod_64, grid_steps)
        self.sampler.num_steps = steps
        self.sampler.set_timesteps(steps)

    @property
    def round_teacher(self) -> torch.nn.Module | None:
        """The frozen copy of the previous round's student (its network), the teacher after the first round."""
        holder = self.__dict__.get("_round_teacher")
        return None if holder is None else holder.value

    def teacher_net(self, round_index: int) -> torch.nn.Module:
        """The network of round k's teacher: the checkpoint's in the first round, then the previous student's copy."""
        return self.teacher.net if round_index <= self.first_round else self.round_teacher

    def teacher_to_device(self) -> None:
        super().teacher_to_device()
        if self.round_teacher is not None:
            self.round_teacher.to(self.device)

    def round_weights(self) -> dict[str, torch.Tensor]:
        """The net weights the round's checkpoint samples with: the EMA's when an EMA callback averages."""
        ema = self._ema()
        if ema is not None and ema._average_model is not None:
            return {k: v.detach().clone() for k, v in ema._average_model.module.net.state_dict().items()}
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def _ema(self) -> WeightAveraging | None:
        trainer = self._trainer
        found = [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, WeightAveraging)]
        if found and getattr(found[0], "_sharded", None) is not None:
            raise ValueError("experiment=progressive_distill: not with trainer=fsdp (its EMA is sharded)")
        return found[0] if found else None

    def next_round(self) -> None:
        """η ← θ: teacher and student start from the finished round's weights; fresh optimizer state; EMA restarts."""
        weights = self.round_weights()
        self.net.load_state_dict(weights)
        self.round_teacher.load_state_dict(weights)
        ema = self._ema()
        if ema is not None and ema._average_model is not None:
            ema._average_model.module.net.load_state_dict(weights)
            ema._average_model.n_averaged.zero_()
            if hasattr(ema, "_num_updates"):
                ema._num_updates = 0  # difflab's EMA: its next update copies the weights, then averages from there
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()
        self.use_round(self.round + 1)
        log.info("progressive distillation: round %d, %d steps", self.round, self.student_steps())

    def round_checkpoint_path(self) -> Path:
        """``<checkpoint dir>/round_<k>_<N_k>steps.ckpt`` (stage one: ``guided_<N_0>steps.ckpt``), in the
        ModelCheckpoint's folder, else <run>/checkpoints."""
        callback = self.trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or Path(self.trainer.default_root_dir) / "checkpoints"
        name = "guided" if self.round < 0 else f"round_{self.round}"
        return Path(folder) / f"{name}_{self.student_steps()}steps.ckpt"

    def on_fit_start(self) -> None:
        if self.teacher is None:
            raise ValueError("model.teacher_ckpt: progressive distillation needs the teacher's checkpoint")
        super().on_fit_start()
        total, max_steps = self.round_end(self.rounds - 1), self.trainer.max_steps
        if max_steps == -1 or max_steps > total:
            # the run ends with the last round (a resume mid-epoch stays exact whatever the limit: CutEpochRestore)
            self.trainer.fit_loop.epoch_loop.max_steps = total
        elif max_steps < total:
            log.warning(
                "trainer.max_steps=%d stops in round %d of %d (model.guidance_steps + model.rounds × "
                "model.steps_per_round = %d; trainer.max_steps=-1 runs them all)",
                max_steps,
                self.round_of(max_steps),
                self.rounds,
                total,
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # lazily at the first batch of a round, so that a run resumed from a checkpoint written at a round's end
        # advances here exactly as the uninterrupted run did
        if self.round_of(self.trainer.global_step) > self.round:
            if not self.round_checkpoint_path().exists():  # killed between last.ckpt and the round's file
                self.trainer.save_checkpoint(self.round_checkpoint_path(), weights_only=False)
            self.next_round()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after the callbacks' hooks: the EMA has seen the round's last step
        if self.trainer.global_step == self.round_end(self.round):
            self.trainer.save_checkpoint(self.round_checkpoint_path(), weights_only=False)

    def configure_optimizers(self) -> Any:
        if not self.lr_anneal:
            return super().configure_optimizers()
        optimizer = self._optimizer([p for p in self.parameters() if p.requires_grad])
        first, steps = self.guidance_steps, self.steps_per_round  # the scheduler's count is global_step

        def decay(step: int) -> float:  # linear to 0 within stage one and within each round
            return 1.0 - (step / first if step < first else ((step - first) % steps) / steps)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

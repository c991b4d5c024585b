"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): a student learns two DDIM (η = 0) steps of its teacher
in one, and the steps halve every round.

Time grid. In the paper's continuous time a student of N steps visits t_i = i/N; here, on the discrete T steps, the
student samples with DDIM on the ``trailing`` grid of N steps (starts at t = T) and its teacher takes two steps on the
trailing grid of 2N, which nests: the 2N grid's even points are the N grid (:func:`round_grid`). From z_t at a student
point t = τ_{2i}, the teacher steps to t' = τ_{2i−1} and t'' = τ_{2i−2} (τ_0: the data, ᾱ = 1):

    z_t = α_t x + σ_t ε                                              (σ_t is our ``std`` s = sqrt(1 − ᾱ_t))
    z_{t'} = α_{t'} x̂_η(z_t) + σ_{t'} ε̂_η(z_t),  z_{t''} likewise from z_{t'}        (DDIM, eq. 12 with η = 0)
    x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t)                            (their eq. 10)
    L_θ = max(SNR_t, 1) ‖x̂_θ(z_t) − x̃‖²,  SNR_t = α_t²/σ_t²                     (their "truncated SNR" weighting)

x̃ is the x̂ with which one DDIM step t → t'' from z_t lands on the teacher's z_{t''} (:func:`distillation_target`).

Parameterisation: ``v`` by default, also for an ε teacher. An ε-student's x̂ = (z_t − σ_t ε̂)/α_t is ill-conditioned
where SNR → 0 (the cosine schedule's t = T: SNR = 2.4e-9 at T = 1000); the loss there is ‖ε̂ − ε̃‖²/SNR_t and the
student's first step from pure noise is not learned. Measured (digits 8×8, ε cosine teacher T = 100, rounds 4 → 2 → 1
steps, 150 steps each; MSE to the teacher's 100-step DDIM samples, same noise): v-student 0.046 (2 steps) and 0.285
(1 step), ε-student 0.272 and 1.574, the teacher's own DDIM 0.177 and 1.161; the ε-student's loss stays ~10³.

Rounds: round k trains a student of N_k = ``start_steps``/2^(k+1) steps for ``steps_per_round`` optimizer steps. At
its end the round's checkpoint is written (``checkpoints/round_<k>_<N_k>steps.ckpt``, sampling with DDIM η = 0,
trailing, N_k steps); the next round's teacher and student both start from the weights that checkpoint samples with
(the EMA when ``callbacks.ema`` is on), with a fresh optimizer state and a restarted EMA, as in the paper. The current
teacher's weights travel in every checkpoint (``checkpoint["progressive_distillation"]``), so a resumed run
(``ckpt_path=last.ckpt``) restores round, teacher, student, EMA and optimizer from that file alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging

from difflab.modules.diffusion import DiffusionModule
from difflab.modules.step_logging import log_train_step
from difflab.modules.teacher import FewStepMixin
from difflab.samplers import DDIMSampler
from difflab.samplers.base import Spacing, spaced_timesteps
from difflab.schedules import NoiseLevel, x0_eps_from_output
from difflab.utils.hashing import state_dict_sha256

log = logging.getLogger(__name__)

STATE_KEY = "progressive_distillation"


def round_grid(alphas_cumprod: torch.Tensor, student_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's trailing grid of 2N points for a student of N steps, from the process's ᾱ (T,) (float64):
    (timesteps (2N,) long ascending, ᾱ (2N + 1,) float64 with ᾱ = 1, the data, at position 0), so position j of the
    second holds τ_j and the network timestep of τ_j is ``timesteps[j − 1]``. The student's grid is τ_2, τ_4, …, τ_2N
    (the trailing grid of N: Spacing.TRAILING's round(T − iT/K) − 1 at K = 2N, i = 2m is the one at K = N, i = m)."""
    timesteps = spaced_timesteps(alphas_cumprod.numel(), 2 * student_steps, Spacing.TRAILING)
    ab = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.to(torch.float64)[timesteps]])
    return timesteps, ab


def level_of(alphas_cumprod: torch.Tensor) -> NoiseLevel:
    """The :class:`NoiseLevel` (α, σ, 1/α, σ/α) of ᾱ (any shape; ᾱ = 1 gives the data: σ = 0)."""
    alpha, std = alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt()
    return NoiseLevel(alpha=alpha, std=std, recip_alpha=1.0 / alpha, sigma=std / alpha)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, to: NoiseLevel) -> torch.Tensor:
    """One DDIM step with η = 0 (Song et al. eq. 12): z_s = α_s x̂ + σ_s ε̂."""
    return to.alpha * x0 + to.std * eps


def distillation_target(z_t: torch.Tensor, z_t2: torch.Tensor, at: NoiseLevel, at2: NoiseLevel) -> torch.Tensor:
    """x̃ of Salimans & Ho eq. 10 from z_t at ``at`` and the teacher's z_{t''} at ``at2``:
    x̃ = (z_{t''} − (σ_{t''}/σ_t) z_t) / (α_{t''} − (σ_{t''}/σ_t) α_t)."""
    ratio = at2.std / at.std
    return (z_t2 - ratio * z_t) / (at2.alpha - ratio * at.alpha)


def truncated_snr_weight(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """max(SNR_t, 1) with SNR_t = ᾱ_t/(1 − ᾱ_t) (Salimans & Ho §4, "truncated SNR" weighting)."""
    return (alphas_cumprod / (1.0 - alphas_cumprod)).clamp(min=1.0)


class ProgressiveDistillationModule(FewStepMixin, DiffusionModule):
    """A student that halves its teacher's DDIM steps ``rounds`` times (see the module docstring).

    Args (beyond :class:`DiffusionModule`'s, whose ``sampler`` must be DDIM η = 0 on the trailing grid):
        teacher_ckpt: the teacher's checkpoint: a Gaussian-diffusion model (``model=ddpm|iddpm|cfg``) or a round
            checkpoint of this module (to go on halving). The student starts from its (EMA) weights; ``src/train.py``
            gives the student the teacher's net, data shape, schedule, class count and variance type.
        rounds: halvings K (``start_steps`` must divide by 2^K).
        start_steps: N_0, the teacher's DDIM steps in the first round; round k's student samples with N_0/2^(k+1).
        steps_per_round: optimizer steps per round; the run stops after ``rounds × steps_per_round``.
        teacher_guidance_scale: w of the teacher's classifier-free guidance in its two steps (labels from the data);
            None: the teacher's own ``guidance_scale``. The student samples unguided (``guidance_scale: 0``): the
            guided teacher is what it learns.
        lr_anneal: the learning rate decays linearly to 0 within each round (restarting with the fresh optimizer).
    """

    few_step_method = "progressive_distillation"
    # the model keys src/train.py takes from the teacher's run config unless the command line sets them
    # (tasks.resume.teacher_config), beside its net and data shape
    teacher_model_keys = ("schedule", "num_classes", "variance_type")

    def __init__(
        self,
        net: Callable[..., torch.nn.Module],
        schedule: Any,
        *args: Any,
        teacher_ckpt: str | None = None,
        rounds: int = 1,
        start_steps: int = 64,
        steps_per_round: int = 1000,
        teacher_guidance_scale: float | None = None,
        lr_anneal: bool = True,
        parameterization: str = "v",
        **kwargs: Any,
    ) -> None:
        process = getattr(schedule, "process_kind", "gaussian")
        if process != "gaussian":  # before the sampler, which would refuse it less clearly
            raise ValueError(
                f"schedule: a {process} process ({type(schedule).__name__}, the teacher's: model.teacher_ckpt="
                f"{teacher_ckpt!r}); progressive distillation distils a Gaussian diffusion model (model=ddpm | "
                "iddpm | cfg): EDM and score-SDE models (σ processes) and rectified flows (experiment=reflow) are "
                "not supported"
            )
        super().__init__(net, schedule, *args, parameterization=parameterization, teacher_ckpt=None, **kwargs)
        self._check_rounds(rounds, start_steps, steps_per_round)
        self.rounds, self.start_steps, self.steps_per_round = rounds, start_steps, steps_per_round
        self.lr_anneal = bool(lr_anneal)
        self._check_sampler()
        if self.guidance_scale:
            raise ValueError(
                f"model.guidance_scale={self.guidance_scale}: the student samples unguided (0); the teacher's guidance "
                "is distilled into it at model.teacher_guidance_scale"
            )
        self.attach_teacher(teacher_ckpt)
        self.round = 0
        self.teacher_guidance = float(teacher_guidance_scale or 0.0)
        if self.teacher is not None:
            self.teacher_guidance = self._check_teacher(teacher_guidance_scale)
            self.net.load_state_dict(self.teacher.net.state_dict())  # θ ← η (Algorithm 2)
            self.use_round(0)

    # ------------------------------------------------------------------ construction checks
    @staticmethod
    def _check_rounds(rounds: int, start_steps: int, steps_per_round: int) -> None:
        for key, value in (("rounds", rounds), ("start_steps", start_steps), ("steps_per_round", steps_per_round)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key}={value!r}: expected a whole number >= 1")
        if start_steps % 2**rounds:
            raise ValueError(
                f"model.start_steps={start_steps} does not halve model.rounds={rounds} times into whole step counts: "
                f"choose start_steps divisible by 2^rounds = {2**rounds}"
            )

    def _check_sampler(self) -> None:
        sampler = self.sampler
        if not (isinstance(sampler, DDIMSampler) and sampler.deterministic and sampler.spacing is Spacing.TRAILING):
            raise ValueError(
                f"sampler: progressive distillation samples with DDIM η = 0 on the trailing grid, got "
                f"{type(sampler).__name__}: use sampler=ddim sampler.eta=0 sampler.sigma=eta sampler.spacing=trailing"
            )
        if self.start_steps > self.diffusion.num_timesteps:
            raise ValueError(
                f"model.start_steps={self.start_steps}: more than the schedule's T={self.diffusion.num_timesteps} steps"
            )

    def _check_teacher(self, teacher_guidance_scale: float | None) -> float:
        """The teacher is a Gaussian-diffusion model like the student (class, schedule, shape, classes); returns
        the teacher's guidance w."""
        teacher, where = self.teacher, f"model.teacher_ckpt={self.teacher_record['ckpt']!r}"
        if type(teacher) not in (DiffusionModule, ProgressiveDistillationModule):
            raise ValueError(
                f"{where}: a {type(teacher).__name__} checkpoint; progressive distillation distils a Gaussian "
                "diffusion model (model=ddpm | iddpm | cfg, or a round checkpoint of experiment=progressive_distill). "
                "EDM and score-SDE models (σ processes), rectified flows (experiment=reflow distils those) and latent "
                "diffusion are not supported"
            )
        if not torch.equal(teacher.diffusion.alphas_cumprod_64, self.diffusion.alphas_cumprod_64):
            raise ValueError(
                f"schedule: the student's ({self.diffusion.extra_repr()}) is not the teacher's "
                f"({teacher.diffusion.extra_repr()}); leave schedule unset to take the teacher's ({where})"
            )
        if tuple(teacher.image_shape) != self.image_shape or teacher.num_classes != self.num_classes:
            raise ValueError(
                f"model.image_shape={list(self.image_shape)}, model.num_classes={self.num_classes}: the teacher's are "
                f"{list(teacher.image_shape)}, {teacher.num_classes} ({where}); leave them to src/train.py"
            )
        if teacher.variance_type is not self.variance_type:
            raise ValueError(f"model.variance_type: the teacher's is {teacher.variance_type.value} ({where})")
        w = teacher.guidance_scale if teacher_guidance_scale is None else float(teacher_guidance_scale)
        if w and not teacher.num_classes:
            raise ValueError(f"model.teacher_guidance_scale={w}: the teacher is unconditional ({where})")
        return w

    # ------------------------------------------------------------------ rounds
    def student_steps(self, round_index: int | None = None) -> int:
        """N_k = start_steps / 2^(k+1): the student's DDIM steps in round k (default: the current round)."""
        return self.start_steps // 2 ** ((self.round if round_index is None else round_index) + 1)

    def trained_steps(self) -> int:
        return self.student_steps()

    def use_round(self, round_index: int) -> None:
        """Make round k current: its grid, and the student's sampler at N_k steps."""
        self.round = round_index
        steps = self.student_steps()
        self._grid_t, self._grid_ab = round_grid(self.diffusion.alphas_cumprod_64, steps)
        self.sampler.num_steps = steps
        self.sampler.set_timesteps(steps)

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
        self.teacher.net.load_state_dict(weights)
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
        """``<checkpoint dir>/round_<k>_<N_k>steps.ckpt`` (the ModelCheckpoint's folder, else <run>/checkpoints)."""
        callback = self.trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or Path(self.trainer.default_root_dir) / "checkpoints"
        return Path(folder) / f"round_{self.round}_{self.student_steps()}steps.ckpt"

    def on_fit_start(self) -> None:
        if self.teacher is None:
            raise ValueError("model.teacher_ckpt: progressive distillation needs the teacher's checkpoint")
        super().on_fit_start()
        total, max_steps = self.rounds * self.steps_per_round, self.trainer.max_steps
        if max_steps == -1 or max_steps > total:
            # the run ends with the last round; set here, before Lightning restores its loops on resume: a mid-epoch
            # resume that reaches the loop restore with max_steps=-1 (and max_epochs=-1) skipped one batch in testing
            self.trainer.fit_loop.epoch_loop.max_steps = total
        elif max_steps < total:
            log.warning(
                "trainer.max_steps=%d stops in round %d of %d (model.rounds × model.steps_per_round = %d; "
                "trainer.max_steps=-1 runs them all)",
                max_steps,
                max_steps // self.steps_per_round,
                self.rounds,
                total,
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # lazily at the first batch of a round, so that a run resumed from a checkpoint written at a round's end
        # advances here exactly as the uninterrupted run did
        if min(self.trainer.global_step // self.steps_per_round, self.rounds - 1) > self.round:
            if not self.round_checkpoint_path().exists():  # killed between last.ckpt and the round's file
                self.trainer.save_checkpoint(self.round_checkpoint_path(), weights_only=False)
            self.next_round()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after the callbacks' hooks: the EMA has seen the round's last step
        step = self.trainer.global_step
        if step == (self.round + 1) * self.steps_per_round:
            self.trainer.save_checkpoint(self.round_checkpoint_path(), weights_only=False)

    # ------------------------------------------------------------------ the loss
    def teacher_fn(self, y: torch.Tensor | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The teacher's (guided) network ``fn(z, t)`` with the data labels ``y`` (unconditional: ignored)."""
        return self.teacher.model_fn(y if self.teacher.num_classes else None, self.teacher_guidance)

    def teacher_x0_eps(
        self, fn: Callable, z: torch.Tensor, t: torch.Tensor, at: NoiseLevel
    ) -> tuple[torch.Tensor, ...]:
        """The teacher's (x̂, ε̂) at (z, t), thresholded as the student's sampler thresholds."""
        teacher = self.teacher
        output, _ = teacher.diffusion.split_output(fn(z, t), teacher.variance_type)
        return x0_eps_from_output(teacher.parameterization, output.float(), z, at, self.sampler.clip_denoised)

    def distillation_loss(
        self, x: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor, i: torch.Tensor
    ) -> torch.Tensor:
        """Per-example loss (B,) of Algorithm 2 at the student's points i ∈ [1, N] (B,) for data x and noise ε
        (B, C, H, W): max(SNR_t, 1) · mean ‖x̂_θ(z_t) − x̃‖² (see the module docstring)."""
        grid_t, grid_ab = self._grid_t.to(x.device), self._grid_ab.to(x.device, torch.float32)
        j = 2 * i  # t = τ_2i, t' = τ_2i−1, t'' = τ_2i−2; network timesteps τ_j = grid_t[j − 1]
        shape = (-1, *([1] * (x.ndim - 1)))
        at, at1, at2 = (level_of(grid_ab[j - k].reshape(shape)) for k in (0, 1, 2))
        t, t1 = grid_t[j - 1], grid_t[j - 2]
        z_t = at.alpha * x + at.std * noise
        with torch.no_grad():
            fn = self.teacher_fn(y)
            z_t1 = ddim_step(*self.teacher_x0_eps(fn, z_t, t, at), at1)
            z_t2 = ddim_step(*self.teacher_x0_eps(fn, z_t1, t1, at1), at2)
            target = distillation_target(z_t, z_t2, at, at2)
        output, _ = self.diffusion.split_output(self(z_t, t, y), self.variance_type)
        x_hat, _ = x0_eps_from_output(self.parameterization, output.float(), z_t, at)
        weight = truncated_snr_weight(grid_ab[j])
        return weight * (x_hat - target).square().flatten(1).mean(1)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, *_ = batch
        i = torch.randint(1, self.student_steps() + 1, (x.shape[0],), device=x.device)  # t = i/N, i ~ U{1..N}
        loss = self.distillation_loss(x, y, torch.randn_like(x), i).mean()
        log_train_step(self, "train/loss", loss, x.shape[0], bar="loss")
        return loss

    def _eval_loss(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """The distillation loss with i and ε drawn from a generator seeded by the batch index."""
        if self.teacher is None:
            raise ValueError("model.teacher_ckpt: the distillation loss needs the teacher")
        x, y, *_ = batch
        generator = torch.Generator(device=x.device).manual_seed(batch_idx)
        i = torch.randint(1, self.student_steps() + 1, (x.shape[0],), generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.distillation_loss(x, y, noise, i).mean()

    def configure_optimizers(self) -> Any:
        if not self.lr_anneal:
            return super().configure_optimizers()
        optimizer = self._optimizer([p for p in self.parameters() if p.requires_grad])
        steps = self.steps_per_round  # linear decay to 0 within each round; the scheduler's count is global_step
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - (step % steps) / steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def few_step_record(self) -> dict[str, Any]:
        """``checkpoint["distillation"]``: also the round, the schedule of rounds and the round's teacher weights."""
        teacher = self.teacher
        return {
            **super().few_step_record(),
            "round": self.round,
            "rounds": self.rounds,
            "start_steps": self.start_steps,
            "teacher_steps": 2 * self.student_steps(),
            "teacher_guidance_scale": self.teacher_guidance,
            "round_teacher_sha256": state_dict_sha256(teacher.net) if teacher is not None else None,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.teacher is not None:  # the current teacher: the previous round's student after round 0
            teacher_state = {k: v.detach().cpu() for k, v in self.teacher.net.state_dict().items()}
            checkpoint[STATE_KEY] = {"round": self.round, "teacher_state_dict": teacher_state}
        record = checkpoint.get("difflab")
        if record and "config" in record:  # the stored sampler samples at this round's N_k (sample.py's default)
            model_cfg = {**record["config"]["model"], "sampler": {**record["config"]["model"]["sampler"]}}
            model_cfg["sampler"]["steps"] = self.student_steps()
            checkpoint["difflab"] = {**record, "config": {**record["config"], "model": model_cfg}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(STATE_KEY) or {}
        recorded = checkpoint.get("distillation") or {}
        if self.teacher is None:  # rebuilt for sampling: the round for the record; the sampler is the config's
            self.round = int(recorded.get("round", state.get("round", 0)))
            return
        if "teacher_state_dict" not in state:
            raise ValueError(f"ckpt_path: not a checkpoint of {type(self).__name__} (no '{STATE_KEY}')")
        self.teacher.net.load_state_dict(state["teacher_state_dict"])
        if recorded.get("teacher"):
            self.teacher_record = recorded["teacher"]  # the run's teacher as it was when the run started
        self.use_round(int(state["round"]))

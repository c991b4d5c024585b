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
steps, 150 steps each; MSE to the teacher's 100-step DDIM samples, same noise): v-student 0.046 (2 steps) and 0.052
(1 step), ε-student 0.272 and 1.574, the teacher's own DDIM 0.177 and 1.161; the ε-student's loss stays ~10³.

Rounds: round k trains a student of N_k = ``start_steps``/2^(k+1) steps for ``steps_per_round`` optimizer steps. At
its end the round's checkpoint is written (``checkpoints/round_<k>_<N_k>steps.ckpt``, sampling with DDIM η = 0,
trailing, N_k steps); the next round's teacher and student both start from the weights that checkpoint samples with
(the EMA when ``callbacks.ema`` is on), with a fresh optimizer state and a restarted EMA, as in the paper. The current
teacher's weights travel in every checkpoint (``checkpoint["progressive_distillation"]``), so a resumed run
(``ckpt_path=last.ckpt``) restores round, teacher, student, EMA and optimizer from that file alone. From round 1
on the teacher is a frozen copy of the previous round's student (its parameterisation, not the first teacher's).

Guidance distillation (Meng et al. 2023; ``model.w_min``/``model.w_max``, :mod:`difflab.modules.guidance_distill`):
the student takes w as an input and every teacher step is at the example's w ~ U[w_min, w_max]; with
``model.guidance_steps`` > 0 the rounds follow a stage one (round −1, ``checkpoints/guided_<N_0>steps.ckpt``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch

from difflab.modules.diffusion import DiffusionModule
from difflab.modules.guidance_distill import GuidanceDistillationMixin
from difflab.modules.guided import GuidedCondition, load_teacher_net
from difflab.modules.progressive_math import (
    ddim_step,
    distillation_target,
    level_of,
    round_grid,
    truncated_snr_weight,
)
from difflab.modules.progressive_rounds import RoundsMixin
from difflab.modules.step_logging import log_train_step
from difflab.modules.teacher import FewStepMixin, Shared
from difflab.samplers import DDIMSampler
from difflab.samplers.base import Spacing
from difflab.schedules import NoiseLevel, Parameterization, x0_eps_from_output
from difflab.utils.hashing import state_dict_sha256

log = logging.getLogger(__name__)

__all__ = [
    "ProgressiveDistillationModule",
    "ddim_step",
    "distillation_target",
    "level_of",
    "round_grid",
    "truncated_snr_weight",
]

STATE_KEY = "progressive_distillation"


class ProgressiveDistillationModule(GuidanceDistillationMixin, RoundsMixin, FewStepMixin, DiffusionModule):
    """A student that halves its teacher's DDIM steps ``rounds`` times (see the module docstring).

    Args (beyond :class:`DiffusionModule`'s, whose ``sampler`` must be DDIM η = 0 on the trailing grid):
        teacher_ckpt: the teacher's checkpoint: a Gaussian-diffusion model (``model=ddpm|iddpm|cfg``) or a round
            checkpoint of this module (to go on halving). The student starts from its (EMA) weights; ``src/train.py``
            gives the student the teacher's net, data shape, schedule, class count, variance type and w range.
        rounds: halvings K (``start_steps`` must divide by 2^K).
        start_steps: N_0, the teacher's DDIM steps in the first round; round k's student samples with N_0/2^(k+1).
        steps_per_round: optimizer steps per round; the run stops after ``guidance_steps + rounds × steps_per_round``.
        teacher_guidance_scale: w of the teacher's classifier-free guidance in its two steps (labels from the data);
            None: the teacher's own ``guidance_scale``. The student samples unguided (``guidance_scale``: 0).
        w_min, w_max: guidance distillation (both null: off): the student takes w as a network input, w ~ U[w_min,
            w_max] per example, and samples guided with one evaluation per step at ``guidance_scale`` (null: the
            teacher's), within the range. guidance_steps: stage one's optimizer steps (0: none; the rounds start
            from the teacher's CFG steps at w, or from a guidance-distilled teacher). guidance_embed_dim: w's features.
        lr_anneal: the learning rate decays linearly to 0 within each round and stage one (restarting with the fresh
            optimizer).
    """

    few_step_method = "progressive_distillation"
    # the model keys src/train.py takes from the teacher's run config unless the command line sets them
    # (tasks.resume.teacher_config), beside its net and data shape: a guidance-distilled teacher passes on its w range
    teacher_model_keys = ("schedule", "num_classes", "variance_type", "w_min", "w_max", "guidance_embed_dim")

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
        guidance_scale: float | None = None,
        w_min: float | None = None,
        w_max: float | None = None,
        guidance_steps: int = 0,
        guidance_embed_dim: int = 256,
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
        net = self.guidance_arguments(net, w_min, w_max, guidance_steps, guidance_embed_dim, teacher_guidance_scale)
        super().__init__(net, schedule, *args, parameterization=parameterization, teacher_ckpt=None, **kwargs)
        self._check_rounds(rounds, start_steps, steps_per_round)
        self.rounds, self.start_steps, self.steps_per_round = rounds, start_steps, steps_per_round
        self.lr_anneal = bool(lr_anneal)
        self._check_sampler()
        self.attach_teacher(teacher_ckpt)
        self._round_teacher = Shared()  # from round 1 (round 0 after stage one): the previous round's student
        self.round = self.first_round
        self.teacher_guidance = float(teacher_guidance_scale or 0.0) if not self.guided else None
        if self.teacher is not None:
            self.teacher_guidance = self._check_teacher(teacher_guidance_scale)
            load_teacher_net(self.net, self.teacher.net, f"model.teacher_ckpt={self.teacher_record['ckpt']!r}")
            self._round_teacher.value = copy.deepcopy(self.net).requires_grad_(False).eval()  # η ← θ (Alg. 2)
        self.guidance_scale = self.default_guidance_scale(guidance_scale)
        if self.teacher is not None:
            self.use_round(self.first_round)

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

    def _check_teacher(self, teacher_guidance_scale: float | None) -> float | None:
        """The teacher is a Gaussian-diffusion model like the student (class, schedule, shape, classes, w input);
        returns the teacher's fixed guidance w (None: drawn per example)."""
        teacher, where = self.teacher, f"model.teacher_ckpt={self.teacher_record['ckpt']!r}"
        if type(teacher) not in (DiffusionModule, ProgressiveDistillationModule):
            raise ValueError(
                f"{where}: a {type(teacher).__name__} checkpoint; progressive distillation distils a Gaussian "
                "diffusion model (model=ddpm | iddpm | cfg, or a round checkpoint of experiment=progressive_distill). "
                "EDM and score-SDE models (σ processes), rectified flows (experiment=reflow distils those) and latent "
                "diffusion are not supported"
            )
        self.check_guided_teacher(teacher, where)
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
        if self.guided:
            return None
        w = teacher.guidance_scale if teacher_guidance_scale is None else float(teacher_guidance_scale)
        if w and not teacher.num_classes:
            raise ValueError(f"model.teacher_guidance_scale={w}: the teacher is unconditional ({where})")
        return w

    # ------------------------------------------------------------------ the loss
    def teacher_fn(self, y: torch.Tensor | None, w: torch.Tensor | None = None) -> tuple[Callable, Parameterization]:
        """(the current teacher's network ``fn(z, t)`` for data labels ``y`` (unconditional: ignored) and, guided,
        w (B,), the parameterisation of its output): the checkpoint's teacher in the first round (CFG at w, or at the
        fixed ``teacher_guidance``), after it the previous round's student (w as its input)."""
        if self.round > self.first_round:
            net = self.round_teacher
            return (lambda z, t: self.call_net(net, z, t, y, w)), self.parameterization
        teacher = self.teacher
        labels = y if teacher.num_classes else None
        return teacher.model_fn(labels, self.teacher_guidance if w is None else w), teacher.parameterization

    def teacher_x0_eps(
        self, fn: Callable, parameterization: Parameterization, z: torch.Tensor, t: torch.Tensor, at: NoiseLevel
    ) -> tuple[torch.Tensor, ...]:
        """The teacher's (x̂, ε̂) at (z, t), thresholded as the student's sampler thresholds."""
        output, _ = self.diffusion.split_output(fn(z, t), self.variance_type)
        return x0_eps_from_output(parameterization, output.float(), z, at, self.sampler.clip_denoised)

    def student_x0(self, z_t: torch.Tensor, t: torch.Tensor, y, w: torch.Tensor | None, at: NoiseLevel):
        """The student's x̂_θ(z_t) (B, C, H, W) at t (B,) for labels y and, guided, w (B,)."""
        condition = GuidedCondition(y, w) if self.guided else y
        output, _ = self.diffusion.split_output(self(z_t, t, condition), self.variance_type)
        return x0_eps_from_output(self.parameterization, output.float(), z_t, at)[0]

    def distillation_loss(
        self, x: torch.Tensor, y: torch.Tensor | None, noise: torch.Tensor, i: torch.Tensor, w=None
    ) -> torch.Tensor:
        """Per-example loss (B,) of Algorithm 2 at the student's points i ∈ [1, N] (B,) for data x and noise ε
        (B, C, H, W) (guided: at w (B,)): max(SNR_t, 1) · mean ‖x̂_θ(z_t) − x̃‖² (see the module docstring)."""
        grid_t, grid_ab = self._grid_t.to(x.device), self._grid_ab.to(x.device, torch.float32)
        j = 2 * i  # t = τ_2i, t' = τ_2i−1, t'' = τ_2i−2; network timesteps τ_j = grid_t[j − 1]
        shape = (-1, *([1] * (x.ndim - 1)))
        at, at1, at2 = (level_of(grid_ab[j - k].reshape(shape)) for k in (0, 1, 2))
        t, t1 = grid_t[j - 1], grid_t[j - 2]
        z_t = at.alpha * x + at.std * noise
        with torch.no_grad():
            fn = self.teacher_fn(y, w)
            z_t1 = ddim_step(*self.teacher_x0_eps(*fn, z_t, t, at), at1)
            z_t2 = ddim_step(*self.teacher_x0_eps(*fn, z_t1, t1, at1), at2)
            target = distillation_target(z_t, z_t2, at, at2)
        x_hat = self.student_x0(z_t, t, y, w, at)
        return truncated_snr_weight(grid_ab[j]) * (x_hat - target).square().flatten(1).mean(1)

    def round_loss(self, x: torch.Tensor, y, noise: torch.Tensor, i: torch.Tensor, w) -> torch.Tensor:
        """The current round's per-example loss (B,): stage one's or Algorithm 2's."""
        return (self.guidance_loss if self.round < 0 else self.distillation_loss)(x, y, noise, i, w)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, *_ = batch
        i = torch.randint(1, self.student_steps() + 1, (x.shape[0],), device=x.device)  # t = i/N, i ~ U{1..N}
        w = self.draw_w(x.shape[0], x.device) if self.guided else None
        loss = self.round_loss(x, y, torch.randn_like(x), i, w).mean()
        log_train_step(self, "train/loss", loss, x.shape[0], bar="loss")
        return loss

    def _eval_loss(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """The loss with i and ε drawn from a generator seeded by the batch index (guided: at w = (w_min + w_max)/2)."""
        if self.teacher is None:
            raise ValueError("model.teacher_ckpt: the distillation loss needs the teacher")
        x, y, *_ = batch
        generator = torch.Generator(device=x.device).manual_seed(batch_idx)
        i = torch.randint(1, self.student_steps() + 1, (x.shape[0],), generator=generator, device=x.device)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        w = torch.full((x.shape[0],), sum(self.w_range) / 2, device=x.device) if self.guided else None
        return self.round_loss(x, y, noise, i, w).mean()

    # ------------------------------------------------------------------ checkpoints
    def few_step_record(self) -> dict[str, Any]:
        """``checkpoint["distillation"]``: also the round, the schedule of rounds, the round's teacher weights and the
        w range (:meth:`guidance_record`)."""
        teacher_net = self.teacher_net(self.round) if self.teacher is not None else None
        return {
            **super().few_step_record(),
            "round": self.round,
            "rounds": self.rounds,
            "start_steps": self.start_steps,
            "teacher_steps": self.student_steps() if self.round < 0 else 2 * self.student_steps(),
            "teacher_guidance_scale": self.teacher_guidance,
            "round_teacher_sha256": state_dict_sha256(teacher_net) if teacher_net is not None else None,
            **self.guidance_record(),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.teacher is not None:  # the current teacher: the previous round's student after the first round
            state = self.teacher_net(self.round).state_dict()
            checkpoint[STATE_KEY] = {"round": self.round, "teacher_state_dict": {k: v.cpu() for k, v in state.items()}}
        record = checkpoint.get("difflab")
        if record and "config" in record:  # sample.py's defaults: this round's N_k steps, the resolved default w
            model_cfg = {**record["config"]["model"], "sampler": {**record["config"]["model"]["sampler"]}}
            model_cfg["sampler"]["steps"] = self.student_steps()
            model_cfg["guidance_scale"] = self.guidance_scale
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
        self.teacher_net(int(state["round"])).load_state_dict(state["teacher_state_dict"])
        if recorded.get("teacher"):
            self.teacher_record = recorded["teacher"]  # the run's teacher as it was when the run started
        self.use_round(int(state["round"]))

"""ConsistencyModule: consistency distillation (CD, Song et al. 2023) and improved consistency training (iCT, Song &
Dhariwal 2023) on the σ view of any of our processes (:mod:`difflab.schedules.consistency` has the math and the
choice of F for an ε-prediction teacher: f = c_skip x̃ + c_out F with F the EDM output of the network's denoiser).

One loss, two targets (CM eq. 7 and eq. 10; iCT eq. 8). For data x_0, n on the N-point Karras grid, z ~ N(0, I):
    x̃_{n+1} = x_0 + σ_{n+1} z
    CD: x̂_n = Φ(x̃_{n+1}, σ_{n+1} → σ_n; teacher)   one Heun step of the teacher's PF-ODE (guided with CFG weight w)
    CT: x̂_n = x_0 + σ_n z                           the same z: an unbiased estimate of that step (CM Thm. 2)
    L = λ(σ_n) d(f_θ(x̃_{n+1}, σ_{n+1}), f_θ⁻(x̂_n, σ_n)),   θ⁻ ← stopgrad(μ θ⁻ + (1 − μ) θ) after each step.
θ⁻ (the *target* network) is a separate copy only when μ = ``target_decay`` > 0 (CD: 0.95); with μ = 0 (iCT) it is
θ itself under no_grad. It is not the EMA callback's average (the weights that sample): it is training state, kept
beside the state dict in ``checkpoint["consistency"]`` (restored exactly on ``ckpt_path=`` resume, never needed for
sampling), like iCT's curriculum length K. The teacher stays out of both (:class:`FewStepMixin`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from difflab.losses.consistency import ConsistencyDistance
from difflab.modules.diffusion import DiffusionModule
from difflab.modules.step_logging import log_train_step
from difflab.modules.teacher import FewStepMixin, Shared
from difflab.samplers import Sampler
from difflab.samplers.consistency import ConsistencySampler
from difflab.schedules.consistency import (
    ConsistencyFunction,
    curriculum_scales,
    denoised,
    heun_step,
    lognormal_index_probabilities,
)
from difflab.utils.enums import StrEnumChoice, parse_enum


class ConsistencyMode(StrEnumChoice):
    DISTILLATION = "distillation"  # CD: the teacher's Heun step gives x̂_n
    TRAINING = "training"  # iCT: no teacher, x̂_n = x_0 + σ_n z


class SigmaSampling(StrEnumChoice):
    UNIFORM = "uniform"  # n ~ U{1 … N−1} (CM)
    LOGNORMAL = "lognormal"  # iCT's discrete log-normal over the grid (P_mean, P_std)


class LossWeighting(StrEnumChoice):
    UNIFORM = "uniform"  # λ = 1 (CM)
    INVERSE_GAP = "inverse_gap"  # λ(σ_n) = 1/(σ_{n+1} − σ_n) (iCT §3.4)


MODE_DEFAULTS = {  # (sigma_sampling, weighting) of each paper
    ConsistencyMode.DISTILLATION: (SigmaSampling.UNIFORM, LossWeighting.UNIFORM),
    ConsistencyMode.TRAINING: (SigmaSampling.LOGNORMAL, LossWeighting.INVERSE_GAP),
}
STATE_KEY = "consistency"


class ConsistencyModule(FewStepMixin, DiffusionModule):
    """``model=consistency``: CD (``mode=distillation``, ``experiment=consistency_distill``) or iCT
    (``mode=training``, ``experiment=consistency_training``); samples with ``sampler=consistency``.

    Args (the DiffusionModule's, and):
        mode: ``distillation`` | ``training``.
        teacher_ckpt: CD's teacher (a DDPM ε/x0/v or an EDM-family checkpoint); the student starts from its
            weights, and ``src/train.py`` gives the student its net, data shape, schedule, parameterization and
            classes (``teacher_model_keys``). CT takes none.
        teacher_guidance_scale: the CFG weight w of a class-conditional teacher's ODE steps (null: its own).
        sigma_min, sigma_max, sigma_data, rho: the consistency function and its Karras grids (null sigma_min: the
            process's smallest σ; sigma_max is capped at the process's largest).
        num_scales: CD's N (CM: 18 for CIFAR-10, 40 for ImageNet-64).
        target_decay: μ of the target network θ⁻ (CM's CD: 0.95; 0: θ⁻ = stopgrad θ, iCT).
        metric: ``l2`` | ``pseudo_huber`` | ``lpips`` | ``fmnist_cls`` | … (:mod:`difflab.losses.consistency`);
            huber_c: pseudo-Huber's c (null: 0.00054·sqrt(C·H·W)).
        sigma_sampling: ``uniform`` | ``lognormal`` (null: CD uniform, CT lognormal); P_mean, P_std: the latter's.
        weighting: ``uniform`` | ``inverse_gap`` (null: CD uniform, CT inverse_gap).
        curriculum_s0, curriculum_s1, total_steps: CT's N(k) (s_0 = 10, s_1 = 1280, K; null K: trainer.max_steps).
    """

    preconditioned = True  # an EDM-family teacher's σ process is allowed (its preconditioning is applied)
    teacher_model_keys = ("schedule", "parameterization", "num_classes")

    def __init__(
        self,
        *args: Any,
        mode: str | ConsistencyMode = ConsistencyMode.DISTILLATION,
        teacher_ckpt: str | None = None,
        teacher_guidance_scale: float | None = None,
        sigma_min: float | None = None,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        num_scales: int = 18,
        target_decay: float = 0.95,
        metric: str = "l2",
        huber_c: float | None = None,
        sigma_sampling: str | None = None,
        P_mean: float = -1.1,  # noqa: N803 (the paper's names)
        P_std: float = 2.0,  # noqa: N803
        weighting: str | None = None,
        curriculum_s0: int = 10,
        curriculum_s1: int = 1280,
        total_steps: int | None = None,
        **kwargs: Any,
    ) -> None:
        self_mode = parse_enum(ConsistencyMode, mode, "model.mode")
        if self_mode is ConsistencyMode.TRAINING and teacher_ckpt:
            raise ValueError(
                f"model.teacher_ckpt={teacher_ckpt!r}: consistency training (model.mode=training) learns without a "
                "teacher; for distillation use experiment=consistency_distill"
            )
        schedule = kwargs.get("schedule", args[1] if len(args) > 1 else None)
        if getattr(schedule, "process_kind", "gaussian") == "flow":
            raise ValueError(
                f"model.schedule: {type(schedule).__name__} (a flow, e.g. a flow teacher's): consistency models here "
                "take a diffusion or EDM-family process; a rectified flow distils with experiment=reflow"
            )
        super().__init__(*args, **kwargs)
        self.mode = self_mode
        self.few_step_method = f"consistency_{self.mode.value}"
        self.consistency = self.build_function(sigma_min, sigma_max, sigma_data, rho)
        self.sampler = self.build_sampler_bound(self.sampler)
        self.check_settings(num_scales, target_decay, P_std, total_steps)
        self.num_scales, self.target_decay = int(num_scales), float(target_decay)
        sampling, weights = MODE_DEFAULTS[self.mode]
        self.sigma_sampling = parse_enum(SigmaSampling, sigma_sampling or sampling, "model.sigma_sampling")
        self.weighting = parse_enum(LossWeighting, weighting or weights, "model.weighting")
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.curriculum = (int(curriculum_s0), int(curriculum_s1))
        curriculum_scales(0, 1, *self.curriculum)  # checks s0, s1 now
        self.total_steps = total_steps
        self.distance = ConsistencyDistance(metric, int(torch.tensor(self.image_shape).prod()), huber_c)
        self.teacher_guidance_scale = teacher_guidance_scale
        self.attach_teacher(teacher_ckpt)
        if self.teacher is not None:
            self.check_teacher()
            self.start_from_teacher()
        self._target = Shared()  # θ⁻: made in setup("fit") when target_decay > 0; shared by the EMA's copy
        self._grids: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
        self._target_step = 0

    # ------------------------------------------------------------------ construction
    def build_function(self, sigma_min, sigma_max, sigma_data, rho) -> ConsistencyFunction:
        """The consistency function over [σ_min, σ_max] within the process's σ range (clear errors otherwise)."""
        view = self.diffusion.continuous
        lo = view.sigma_min if sigma_min is None else float(sigma_min)
        if lo < view.sigma_min * (1 - 1e-6):
            raise ValueError(
                f"model.sigma_min={sigma_min}: below the process's smallest σ {view.sigma_min:.4g} (the network never "
                "saw less noise); null takes it"
            )
        hi = min(float(sigma_max), view.sigma_max)
        if not lo < hi:
            raise ValueError(f"model.sigma_min={lo:.4g}, sigma_max={hi:.4g}: expected sigma_min < sigma_max")
        return ConsistencyFunction(lo, hi, sigma_data, rho)

    def build_sampler(self, sampler: Callable[..., Sampler]) -> Sampler:
        return self.build_sampler_bound(super().build_sampler(sampler))

    def build_sampler_bound(self, sampler: Sampler) -> Sampler:
        """A :class:`ConsistencySampler` samples with this model's own f (σ_min, σ_max, σ_d)."""
        consistency = self.__dict__.get("consistency")
        if isinstance(sampler, ConsistencySampler) and consistency is not None:
            sampler.bind(consistency)
        return sampler

    def check_settings(self, num_scales: int, target_decay: float, p_std: float, total_steps: int | None) -> None:
        if num_scales < 2:
            raise ValueError(f"model.num_scales={num_scales}: CD's grid needs N >= 2 points")
        if not 0.0 <= target_decay < 1.0:
            raise ValueError(f"model.target_decay={target_decay}: expected μ in [0, 1) (0: θ⁻ = stopgrad θ)")
        if not p_std > 0:
            raise ValueError(f"model.P_std={p_std}: expected > 0")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"model.total_steps={total_steps}: expected >= 1 (null: trainer.max_steps)")

    def check_teacher(self) -> None:
        """The teacher must be a diffusion (Gaussian or σ-process) model of the student's shape, process and
        parameterization: src/train.py arranges that (teacher_model_keys); a command line that changes one is an
        error here, naming the key."""
        teacher, where = self.teacher, f"model.teacher_ckpt={self.teacher_record['ckpt']!r}"
        kind = getattr(teacher.diffusion, "process_kind", "gaussian")
        self.check_teacher_kind(teacher, kind, where)
        if tuple(teacher.image_shape) != self.image_shape:
            raise ValueError(
                f"{where}: the teacher makes {list(teacher.image_shape)} images, the student {list(self.image_shape)}"
                "; leave data.image_size and data.channels to the teacher (or set them to its)"
            )
        mine, its = self.diffusion.continuous, teacher.diffusion.continuous
        same = type(self.diffusion) is type(teacher.diffusion) and repr(self.diffusion) == repr(teacher.diffusion)
        if kind == "gaussian":
            same = same and torch.allclose(mine.sigmas, its.sigmas)
        if not same:
            raise ValueError(f"{where}: the student's schedule differs from the teacher's; leave schedule to it")
        for key in ("parameterization", "num_classes"):
            if getattr(teacher, key) != getattr(self, key):
                raise ValueError(
                    f"{where}: model.{key}={getattr(self, key)} but the teacher's is {getattr(teacher, key)}"
                )

    def check_teacher_kind(self, teacher, kind: str, where: str) -> None:
        """A pixel-space diffusion or EDM-family teacher (a latent student, LatentConsistencyModule, takes a latent
        one instead)."""
        if kind == "flow" or type(teacher).__name__ == "LatentDiffusionModule":
            raise ValueError(
                f"{where}: a {type(teacher).__name__} ({kind} process); consistency distillation here takes a "
                "pixel-space diffusion or EDM-family teacher (a rectified flow distils with experiment=reflow; a "
                "latent diffusion teacher with experiment=latent_consistency)"
            )

    def start_from_teacher(self) -> None:
        """θ (and θ⁻) start as the teacher's (EMA) network (CM §5); another architecture is an error."""
        try:
            self.net.load_state_dict(self.teacher.net.state_dict())
        except RuntimeError as error:
            raise ValueError(
                f"model.teacher_ckpt={self.teacher_record['ckpt']!r}: its network does not match the student's net "
                f"({str(error).splitlines()[0]}); leave net to the teacher"
            ) from None

    # ------------------------------------------------------------------ the consistency function
    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.net_denoise(self.net, x, t, y)

    def net_denoise(self, net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The raw output of ``net`` (θ or θ⁻) at (x, t): preconditioned (D) on a σ process, as trained otherwise."""
        condition = y if self.num_classes else None
        if getattr(self.diffusion, "process_kind", "gaussian") == "sigma":
            return self.diffusion.precondition(lambda x_in, c: net(self.net_input(x_in), c, condition), x, t)
        return net(self.net_input(x), t, condition)

    def consistency_output(self, net, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        """f_net(x̃, σ) (B, C, H, W) for x̃ (B, C, H, W), σ and its network timestep t (B,)."""
        fn = lambda x_in, t_in: self.net_denoise(net, x_in, t_in, y)  # noqa: E731
        return self.consistency(x, denoised(self.diffusion, self.parameterization, fn, x, sigma, t), sigma)

    def teacher_step(self, x: torch.Tensor, start: tuple, end: tuple, y) -> torch.Tensor:
        """CD's x̂_n: one Heun step of the teacher's (CFG-guided) PF-ODE from σ_{n+1} to σ_n, without gradients."""
        teacher = self.teacher
        w = teacher.guidance_scale if self.teacher_guidance_scale is None else self.teacher_guidance_scale
        fn = teacher.model_fn(y if teacher.num_classes else None, float(w))
        solver = lambda x_in, s, t: denoised(teacher.diffusion, teacher.parameterization, fn, x_in, s, t)  # noqa: E731
        with torch.no_grad():
            return heun_step(solver, x, start, end)

    # ------------------------------------------------------------------ the loss
    def grid(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(σ (N,), t (N,), index probabilities (N − 1,), N) of the current grid on ``device`` (CT: N(k))."""
        n = self.current_scales()
        key = (n, str(device))
        if key not in self._grids:
            sigmas = self.consistency.grid(n)
            t = self.diffusion.continuous.sigma_to_t(sigmas)
            if self.sigma_sampling is SigmaSampling.LOGNORMAL:
                probs = lognormal_index_probabilities(sigmas, self.P_mean, self.P_std)
            else:
                probs = torch.full((n - 1,), 1.0 / (n - 1), dtype=torch.float64)
            self._grids = {key: tuple(v.to(device, torch.float32) for v in (sigmas, t, probs))}
        return (*self._grids[key], n)

    def current_scales(self) -> int:
        """N: CD's ``num_scales``; CT's N(k) at this global step k."""
        if self.mode is ConsistencyMode.DISTILLATION:
            return self.num_scales
        return curriculum_scales(int(self.global_step), self.curriculum_steps(), *self.curriculum)

    def curriculum_steps(self) -> int:
        """CT's K: ``model.total_steps``, else the trainer's max_steps (recorded in checkpoints: a resumed run keeps
        its curriculum)."""
        if self.total_steps is None:
            max_steps = self._trainer.max_steps if self._trainer is not None else -1
            if max_steps is None or max_steps < 1:
                raise ValueError("model.total_steps=null needs trainer.max_steps >= 1 (CT's curriculum length K)")
            self.total_steps = int(max_steps)
        return int(self.total_steps)

    def consistency_loss(self, x0, y, index: torch.Tensor, noise: torch.Tensor, grid) -> torch.Tensor:
        """Per-example λ(σ_n) d(f_θ(x̃_{n+1}, σ_{n+1}), f_θ⁻(x̂_n, σ_n)) (B,) for grid pairs ``index`` (B,)."""
        sigmas, t, _, _ = grid
        lo, hi = (sigmas[index], t[index]), (sigmas[index + 1], t[index + 1])
        x_hi = x0 + hi[0].reshape(-1, *([1] * (x0.ndim - 1))) * noise
        online = self.consistency_output(self.net, x_hi, *hi, y)
        if self.mode is ConsistencyMode.DISTILLATION:
            x_lo = self.teacher_step(x_hi, hi, lo, y)
        else:
            x_lo = x0 + lo[0].reshape(-1, *([1] * (x0.ndim - 1))) * noise
        target_net = self.target_net or self.net
        if target_net is not self.net:
            target_net.train(self.training)
        with torch.no_grad():
            target = self.consistency_output(target_net, x_lo, *lo, y)
        weight = 1.0 / (hi[0] - lo[0]) if self.weighting is LossWeighting.INVERSE_GAP else torch.ones_like(lo[0])
        return weight * self.distance(online.float(), target.float())

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x, y, *_ = batch
        grid = self.grid(x.device)
        index = torch.multinomial(grid[2], x.shape[0], replacement=True)
        loss = self.consistency_loss(x, self.training_condition(y), index, torch.randn_like(x), grid).mean()
        log_train_step(self, "train/loss", loss, x.shape[0], bar="loss")
        if self.mode is ConsistencyMode.TRAINING:  # the curriculum N(k)
            self.log("train/num_scales", float(grid[3]), on_step=True, on_epoch=False)
        return loss

    def _eval_loss(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        """The loss with n and z from a generator seeded by the batch index (comparable curves)."""
        x, y, *_ = batch
        generator = torch.Generator(device=x.device).manual_seed(batch_idx)
        grid = self.grid(x.device)
        index = torch.multinomial(grid[2], x.shape[0], replacement=True, generator=generator)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.consistency_loss(x, y, index, noise, grid).mean()

    def eval_timesteps(self, batch_size: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The network timestep of σ_max (B,): where one-step sampling evaluates."""
        t = self.diffusion.continuous.sigma_to_t(torch.tensor([self.consistency.sigma_max], dtype=torch.float64))
        return t.float().to(device).expand(batch_size)

    # ------------------------------------------------------------------ the target network θ⁻
    @property
    def target_net(self) -> torch.nn.Module | None:
        """θ⁻ (None until setup("fit"), and with μ = 0): not a submodule, so neither in the state dict nor averaged."""
        holder = self.__dict__.get("_target")
        return None if holder is None else holder.value

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.mode is ConsistencyMode.DISTILLATION and self.teacher is None:
            raise ValueError("model.teacher_ckpt=null: consistency distillation needs a teacher checkpoint")
        if stage == "fit" and self.target_decay > 0 and self.target_net is None:
            self._target.value = copy.deepcopy(self.net).requires_grad_(False)  # θ⁻ = θ at the start

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.target_net is not None:
            self.target_net.to(self.device)

    def on_train_start(self) -> None:
        self._target_step = int(self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.global_step > self._target_step:  # after each optimizer step (not each accumulated batch)
            self.update_target()
            self._target_step = int(self.global_step)

    @torch.no_grad()
    def update_target(self) -> None:
        """θ⁻ ← μ θ⁻ + (1 − μ) θ (CM Alg. 2/3), parameters lerped, buffers copied."""
        target = self.target_net
        if target is None:
            return
        params = [(a, b.detach().to(a.device)) for a, b in zip(target.parameters(), self.net.parameters(), strict=True)]
        torch._foreach_lerp_([a for a, _ in params], [b for _, b in params], 1.0 - self.target_decay)
        for a, b in zip(target.buffers(), self.net.buffers(), strict=True):
            a.copy_(b)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        target = self.target_net
        checkpoint[STATE_KEY] = {
            "target": None if target is None else {k: v.detach().cpu() for k, v in target.state_dict().items()},
            "total_steps": self.total_steps,
            "num_scales": self.current_scales()
            if self.total_steps or self.mode is ConsistencyMode.DISTILLATION
            else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(STATE_KEY) or {}
        if state.get("total_steps") is not None:
            self.total_steps = int(state["total_steps"])  # the run's K: a resumed run keeps its curriculum
        target = self.target_net
        if target is not None and state.get("target") is not None:
            target.load_state_dict(state["target"])

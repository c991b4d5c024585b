"""Reflow's training data: K fixed (noise, sample) couplings of a trained teacher (Liu et al. 2022, §2.3 "Reflow";
from a diffusion teacher, InstaFlow: Liu et al. 2023).

The teacher (a rectified flow, ``model=rectified_flow``, or a pixel-space Gaussian diffusion, ``model=ddpm | iddpm |
cfg``) integrates its ODE from K seeded noises ε_k with a deterministic sampler (``teacher_sampler``: a
``conf/sampler`` name, null for the checkpoint's own; ``teacher_steps`` steps; see :mod:`difflab.data.teacher_sampler`
for the checks and the noise convention x_T = ε_k); the pairs (x̂_0,k = ODE(ε_k), ε_k) are cached in one ``.pt`` file
(plain tensors, read with ``weights_only``) with what made them (``settings``, checked when read) and what they cost
(``generation``: network evaluations and seconds), and reused by every later run with the same settings. Batches are
``(x_0, y, ε)``: the DiffusionModule trains on the coupling (x_τ = (1 − τ) x̂_0 + τ ε) instead of fresh noise. ``val``
holds the last ``val_size`` pairs (the loss on held-out couplings); ``test`` is the teacher's real test set, so FID in
``eval.py`` and the metric callbacks compares with real images, never with the teacher's samples.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch.utils.data import Dataset

from difflab.data.base import ImageDataModule, _check_int
from difflab.data.teacher_sampler import check_teacher, choose_sampler
from difflab.samplers import sample_loop
from difflab.utils.checkpoint_io import AtomicCheckpointIO, CheckpointError, load_checkpoint
from difflab.utils.hashing import json_sha256
from difflab.utils.stored_config import check_stored_config

log = logging.getLogger(__name__)

# The pairs' noise comes from the generator seeded NOISE_STREAM + seed, not seed: sample.py, eval.py and the studies
# seed theirs with small integers (seed + rank, seed·1000 + batch), and a reflowed model sampled from the very noises
# it was trained on (its couplings' ε_k) would be scored on its training pairs. Below 2**32: torch's CPU generator
# (mt19937) keeps only a seed's low 32 bits.
NOISE_STREAM = 2_000_000_011


def noise_seed(seed: int) -> int:
    """The seed of the pairs' noise generator for ``data.seed`` (see NOISE_STREAM)."""
    return (NOISE_STREAM + int(seed)) % 2**32


class PairDataset(Dataset):
    """Items (x_0 (C, H, W) float32, y int64, noise (C, H, W) float32) of pairs held in memory."""

    def __init__(self, x_start: torch.Tensor, noise: torch.Tensor, labels: torch.Tensor) -> None:
        self.x_start, self.noise, self.labels = x_start, noise, labels

    def __len__(self) -> int:
        return len(self.x_start)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x_start[i], self.labels[i], self.noise[i]


@torch.no_grad()
def generate_pairs(
    teacher: Any, num_pairs: int, steps: int | None, seed: int, batch_size: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """K = ``num_pairs`` couplings of ``teacher`` (a DiffusionModule of a flow or a Gaussian diffusion, with the
    sampler to use built in): ``noise`` (K, C, H, W) from the CPU generator seeded ``noise_seed(seed)`` (the same
    pairs on any device), ``x_start`` (K, C, H, W) = the sampler's solution from x_T = ε (``steps`` steps, the
    teacher's default guidance), ``labels`` (K,) (all classes in turn; zeros if unconditional), and ``generation``:
    the cost (``network_evaluations``: per image, a guided 2B batch counting twice; ``seconds``; ``nfe_per_pair``)."""
    noise = torch.randn((num_pairs, *teacher.image_shape), generator=torch.Generator().manual_seed(noise_seed(seed)))
    classes = teacher.num_classes or 0
    labels = torch.arange(num_pairs) % classes if classes else torch.zeros(num_pairs, dtype=torch.long)
    sampler, chunks, evaluations = teacher.sampler, [], 0
    sampler.set_timesteps(steps)
    if sampler.init_noise_sigma != 1.0:  # the VP and flow samplers start from N(0, I): x_T = ε
        raise ValueError(f"{type(sampler).__name__} starts from N(0, {sampler.init_noise_sigma}²): not x_T = ε")
    guided = 2 if classes and teacher.guidance_scale else 1
    teacher.eval()
    start = time.perf_counter()
    for first in range(0, num_pairs, batch_size):
        eps = noise[first : first + batch_size].to(device)
        y = labels[first : first + batch_size].to(device) if classes else None
        with teacher.sampling_precision():
            chunks.append(
                sample_loop(
                    teacher.model_fn(y, teacher.guidance_scale), sampler, eps.shape, num_steps=steps, noise=eps
                ).cpu()
            )
        evaluations += sampler.nfe * len(eps) * guided
    generation = {
        "network_evaluations": evaluations,
        "nfe_per_pair": evaluations / num_pairs,
        "seconds": time.perf_counter() - start,
    }
    return {"x_start": torch.cat(chunks).float(), "noise": noise, "labels": labels, "generation": generation}


class PairsDataModule(ImageDataModule):
    """Reflow couplings of ``teacher_ckpt`` as a data module (batches (x_0, y, ε); see the module docstring).

    Args:
        teacher_ckpt: a rectified flow's checkpoint (``python src/train.py model=rectified_flow``) or a pixel-space
            Gaussian diffusion's (``model=ddpm | iddpm | cfg``).
        num_pairs: K, the couplings generated (``val_size`` of them held out for the validation loss).
        teacher_steps: steps of the teacher's sampler (its ``steps`` when null).
        teacher_sampler: the solver, a ``conf/sampler`` file name (``ddim``, ``dpmpp_2m``, ``flow_heun``, ...); null:
            the checkpoint's own sampler. It must be deterministic (checked here: an ODE solver, not DDPM, DDIM with
            η > 0 nor an SDE solver).
        teacher_sampler_options: that sampler's settings (``{eta: 0.0, sigma_schedule: model}``).
        cache_path: the ``.pt`` of the pairs (null: ``<teacher dir>/reflow_pairs_<K>_<steps>_seed<seed>.pt``, with
            ``_<sampler>`` and a hash of its config after K when a sampler is chosen); an existing file made with
            other settings is an error.
        generate_batch_size: batch of the teacher while generating.
        image_size, channels: must equal the teacher's data (the model config reads them from here).
        The other arguments as :class:`ImageDataModule`.
    """

    in_memory = False

    def __init__(
        self,
        teacher_ckpt: str,
        num_pairs: int = 4096,
        teacher_steps: int | None = None,
        cache_path: str | None = None,
        generate_batch_size: int = 256,
        teacher_sampler: str | None = None,
        teacher_sampler_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("data_dir", ".")
        super().__init__(**kwargs)
        from difflab.modules import read_run_record  # modules import data; data needs modules only for the teacher

        self.teacher_ckpt = str(teacher_ckpt)
        where = f"model.teacher_ckpt={self.teacher_ckpt!r}"
        record = read_run_record(self.teacher_ckpt, "model.teacher_ckpt")
        self.teacher_data = record["config"]["data"]
        check_stored_config(self.teacher_data, where, "difflab.config.data")
        model_cfg = record["config"]["model"]
        process = check_teacher(model_cfg, where)
        self.num_classes = model_cfg.get("num_classes")
        taught = (int(self.teacher_data["channels"]), int(self.teacher_data["image_size"]))
        if taught != (self.channels, self.image_size):
            raise ValueError(
                f"data.channels={self.channels}, data.image_size={self.image_size}: the teacher {self.teacher_ckpt} "
                f"was trained on channels={taught[0]}, image_size={taught[1]}; set those"
            )
        self.num_pairs = _check_int("num_pairs", num_pairs, self.val_size + self.batch_size)
        self.teacher_steps = None if teacher_steps is None else _check_int("teacher_steps", teacher_steps, 1)
        self.generate_batch_size = _check_int("generate_batch_size", generate_batch_size, 1)
        self.teacher_sampler = teacher_sampler
        self.sampler_config = choose_sampler(
            model_cfg, process, teacher_sampler, teacher_sampler_options, self.teacher_steps, where
        )
        self._cache = cache_path

    @property
    def settings(self) -> dict[str, Any]:
        """What the cached pairs depend on (stored in the file and checked when it is read); ``sampler`` only when
        one is chosen; ``noise_seed``: the pairs' noise stream (files from before it are refused, naming the fix)."""
        settings = {
            "teacher_ckpt": self.teacher_ckpt,
            "num_pairs": self.num_pairs,
            "steps": self.teacher_steps,
            "seed": self.seed,
            "noise_seed": noise_seed(self.seed),
        }
        if self.sampler_config is not None:
            settings["sampler"] = self.sampler_config
        return settings

    @property
    def cache_path(self) -> Path:
        if self._cache:
            return Path(self._cache)
        solver = ""
        if self.sampler_config is not None:  # the sampler and a hash of its whole config: no two solvers share a file
            solver = f"_{self.teacher_sampler or 'own'}-{json_sha256(self.sampler_config)[:8]}"
        name = f"reflow_pairs_{self.num_pairs}{solver}_{self.teacher_steps or 'own'}_seed{self.seed}.pt"
        return Path(self.teacher_ckpt).parent / name

    def prepare_data(self) -> None:
        """Generate and cache the pairs unless the cache exists (rank 0 only, under Lightning)."""
        if self.cache_path.is_file():
            return
        from difflab.modules import load_module

        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        teacher, built = load_module(
            self.teacher_ckpt, sampler=self.sampler_config, map_location=device, key="model.teacher_ckpt"
        )
        log.info(
            "Reflow: generating %d pairs with the teacher %s (%s)",
            self.num_pairs,
            self.teacher_ckpt,
            built["sampler"]["_target_"].rsplit(".", 1)[-1],
        )
        pairs = generate_pairs(teacher, self.num_pairs, self.teacher_steps, self.seed, self.generate_batch_size, device)
        AtomicCheckpointIO().save_checkpoint({**pairs, "settings": self.settings}, self.cache_path)
        cost = pairs["generation"]
        log.info(
            "Reflow pairs cached in %s (%d network evaluations, %.0f s)",
            self.cache_path,
            cost["network_evaluations"],
            cost["seconds"],
        )

    def load_pairs(self) -> dict[str, torch.Tensor]:
        """The cached pairs (generated first if missing), checked against this module's settings."""
        self.prepare_data()
        pairs = load_checkpoint(self.cache_path, "data.cache_path")
        if not isinstance(pairs, dict) or pairs.get("settings") != self.settings:
            found = pairs.get("settings") if isinstance(pairs, dict) else type(pairs).__name__
            raise CheckpointError(
                f"data.cache_path={str(self.cache_path)!r}: holds pairs made with {found}, not {self.settings}; "
                "delete the file or point data.cache_path elsewhere"
            )
        return pairs

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        pairs = self.load_pairs()
        n_train = self.num_pairs - self.val_size
        if self.limit_train_size is not None:
            n_train = min(n_train, self.limit_train_size)
        split = lambda part: PairDataset(*(pairs[k][part] for k in ("x_start", "noise", "labels")))  # noqa: E731
        real = instantiate(self.teacher_data)
        real.setup("test")
        return split(slice(0, n_train)), split(slice(self.num_pairs - self.val_size, None)), real.test

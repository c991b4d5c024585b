"""Run directories: one per run, also for runs started in the same second, and none left empty by a run that fails
before it writes anything."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# directories unique_dir created in this process: the only ones a failed start may remove
_CREATED: set[str] = set()


def _launched_as_other_rank() -> bool:
    """A process of a multi-process launch that is not its first (torchrun, SLURM, Lightning's DDP children)."""
    return any(os.environ.get(name, "0") != "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def shared_launch_id() -> str | None:
    """A name every process of one multi-process launch computes alike: ``torchrun-<rendezvous id>`` (torchrun's
    ``--rdzv-id``, the same on every node) or ``slurm-<job id>.<step id>`` (``srun`` with several tasks); None for a
    single process or Lightning's own launcher (whose children are given rank 0's directory)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
    return None


def unique_dir(path: str) -> str:
    """``${unique_dir:PATH}`` (the run and sweep dirs of ``conf/hydra/default.yaml``): PATH, or PATH_1, PATH_2, ...,
    the first that did not exist, created here with an atomic ``mkdir``, so two runs started in the same second
    never share a directory (each would replace the other's checkpoints and samples).

    Every process of a torchrun/SLURM launch (each node runs Hydra itself) gets one shared directory instead, named
    after the launch (:func:`shared_launch_id`: ``runs/torchrun-<rdzv id>``), which each creates if missing; without
    such an id, a non-first rank gets PATH itself (it cannot know rank 0's pick; such launches should fix
    ``hydra.run.dir``). Lightning's DDP children never ask, they get rank 0's directory on their command line.
    The result is cached per config (OmegaConf), so every read of ``hydra.run.dir`` in a run sees one directory.
    """
    if launch := shared_launch_id():
        shared = Path(path).parent / launch
        shared.mkdir(parents=True, exist_ok=True)
        return str(shared)
    if _launched_as_other_rank():
        return path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    candidate, suffix = path, 0
    while True:
        try:
            os.mkdir(candidate)
            _CREATED.add(os.path.abspath(candidate))
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = f"{path}_{suffix}"


def given_out_dir(*, _root_: DictConfig) -> str | None:
    """``${given_out_dir:}``: the ``out_dir`` the command line gave (``sample.py out_dir=DIR``), or None: none given
    (the key keeps its default interpolation, the run dir) or the task has no such key."""
    if "out_dir" not in _root_ or OmegaConf.is_interpolation(_root_, "out_dir"):
        return None
    value = _root_.get("out_dir")
    return None if value is None else str(value)


def run_dir(out_dir: str | None, default: str) -> str:
    """``${run_dir:${given_out_dir:},PATH}`` (``hydra.run.dir`` of ``conf/hydra/default.yaml``; cached per config
    like :func:`unique_dir`): the ``out_dir`` the user gave, so ``sample.py out_dir=DIR`` writes into DIR only (its
    ``.hydra/`` record and log included) and creates no ``logs/<task>/runs/...``; otherwise :func:`unique_dir` of
    PATH."""
    return str(out_dir) if out_dir else unique_dir(default)


def is_unused(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds nothing but what Hydra writes at the start of every run (``.hydra/``, the job log)."""
    return run_dir.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())


@contextlib.contextmanager
def remove_if_unused_on_error(run_dir: str | Path | None) -> Iterator[None]:
    """Around a job: if it raises before writing anything into ``run_dir`` (e.g. a config value fails validation),
    remove the directory Hydra created for it, so failed starts leave no empty run dirs behind. A directory with
    anything else in it (a checkpoint, a log folder) is kept. Pass ``None`` to keep it anyway: a multirun job's dir
    stays, since the sweep summary gives the failed job a row (and the reason) read from its ``.hydra/``."""
    try:
        yield
    except BaseException:
        if run_dir is not None and not _launched_as_other_rank() and is_unused(Path(run_dir)):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def removable_run_dir() -> str | None:
    """The Hydra run dir of this job if a failed start may remove it (:func:`remove_if_unused_on_error`): a single
    run's; ``None`` for a multirun job, whose dir keeps the sweep summary's record of the failure."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    if hydra_cfg.mode != RunMode.RUN or os.path.abspath(output_dir) not in _CREATED:
        return None  # a multirun job's, or a folder the user named (out_dir=): never removed
    return output_dir

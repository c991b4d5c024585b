"""Hydra/OmegaConf helpers: resolvers and building lists of objects from config groups."""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from difflab.utils.help import config_groups, config_groups_help
from difflab.utils.paths import user_cache_dir
from difflab.utils.run_dir import given_out_dir, run_dir, unique_dir
from difflab.utils.sweep_summary import job_dirname, sweep_name

log = logging.getLogger(__name__)


def wandb_offline() -> bool:
    """``${wandb_offline:}``: offline unless the user chose: WANDB_MODE set (wandb reads it itself) or
    WANDB_API_KEY present."""
    return not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))


def data_num_classes(*, _root_: DictConfig) -> int:
    """``${data_num_classes:}``: the class count of the configured data module (``data``), so class-conditional
    models take it from the data rather than from a hand-set number."""
    data_cfg = _root_.data
    count = getattr(get_class(data_cfg._target_), "num_classes", None)
    if not isinstance(count, int):  # computed per instance (image folders): build the (cheap) module
        count = instantiate(data_cfg).num_classes
    if not count:
        raise ValueError(f"data={data_cfg._target_} has no class labels: a class-conditional model needs them")
    return count


def data_class_names(*, _root_: DictConfig) -> ListConfig:
    """``${data_class_names:}``: the class names of the configured data module (for synthetic captions)."""
    data_cfg = _root_.data
    names = getattr(get_class(data_cfg._target_), "class_names", ())
    if not names and ("ImageFolder" in data_cfg._target_ or "LatentData" in data_cfg._target_):  # per instance
        names = instantiate(data_cfg).class_names
    return OmegaConf.create(list(names))


def launch_dir() -> str:
    """``${launch_dir:}``: the directory the command was started from (runs never change it: ``hydra.job.chdir``
    is false)."""
    return os.getcwd()


def register_resolvers() -> None:
    """Register difflab's OmegaConf resolvers (idempotent): ``${wandb_offline:}``, ``${data_num_classes:}``,
    ``${data_class_names:}``, ``${unique_dir:PATH}`` and ``${run_dir:PATH}`` (cached: one directory per config),
    ``${launch_dir:}``, ``${user_cache_dir:SUBDIR}`` (:func:`difflab.utils.paths.user_cache_dir`),
    ``${config_groups_help:NAME}`` and ``${config_groups:NAME}`` (``--help``), ``${job_dirname:NUM}`` and
    ``${sweep_name:DEFAULT}`` (multirun job
    folders and the wandb group)."""
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)
    if not OmegaConf.has_resolver("data_num_classes"):
        OmegaConf.register_new_resolver("data_num_classes", data_num_classes)
    if not OmegaConf.has_resolver("data_class_names"):
        OmegaConf.register_new_resolver("data_class_names", data_class_names)
    if not OmegaConf.has_resolver("launch_dir"):
        OmegaConf.register_new_resolver("launch_dir", launch_dir)
    for name, resolver in (("job_dirname", job_dirname), ("sweep_name", sweep_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True)
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", run_dir, use_cache=True)
    if not OmegaConf.has_resolver("config_groups_help"):
        OmegaConf.register_new_resolver("config_groups_help", config_groups_help)
    if not OmegaConf.has_resolver("config_groups"):
        OmegaConf.register_new_resolver("config_groups", config_groups)
    if not OmegaConf.has_resolver("given_out_dir"):
        OmegaConf.register_new_resolver("given_out_dir", given_out_dir)
    if not OmegaConf.has_resolver("user_cache_dir"):
        OmegaConf.register_new_resolver("user_cache_dir", lambda *parts: str(user_cache_dir(*parts)))


def instantiate_group(
    cfg: DictConfig | None, overrides: dict[str, dict[str, Any]] | None = None, group: str = "callbacks"
) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (``callbacks``, ``logger``) that has a ``_target_``.

    ``overrides`` maps an entry's ``_target_`` to extra constructor kwargs. Entries set to null are skipped, and so
    are entries with settings but no ``_target_``, with a warning naming them: an experiment's settings for a
    callback the command line left out (``experiment=quickstart callbacks=none`` keeps quickstart's
    ``callbacks.ema.decay``). An entry that is not a mapping is an error.
    """
    objects: list[Any] = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{group}: expected a mapping of configs, got {type(cfg).__name__}")
    for name, entry in cfg.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig):
            raise ValueError(f"{group}.{name}={entry!r}: expected a mapping with a _target_ key (or null)")
        if "_target_" not in entry:
            log.warning(
                "%s.%s sets %s but no %s of that name is selected (%s=...): ignored",
                group,
                name,
                ", ".join(map(str, entry)),
                group.rstrip("s"),
                group,
            )
            continue
        extra = (overrides or {}).get(entry._target_, {})
        objects.append(instantiate(entry, **extra))
    return objects

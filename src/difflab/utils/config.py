"""Hydra/OmegaConf helpers: resolvers and building lists of objects from config groups."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from difflab.utils.loggers import wandb_offline


def register_resolvers() -> None:
    """Register difflab's OmegaConf resolvers (idempotent): ``${wandb_offline:}``."""
    if not OmegaConf.has_resolver("wandb_offline"):
        OmegaConf.register_new_resolver("wandb_offline", wandb_offline)


def instantiate_group(cfg: DictConfig | None, overrides: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, logger) that has a ``_target_``.

    ``overrides`` maps an entry's ``_target_`` to extra constructor kwargs. Entries set to null are skipped.
    """
    objects: list[Any] = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"expected a mapping of configs, got {type(cfg).__name__}")
    for name, entry in cfg.items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ValueError(f"config entry {name!r} has no _target_; expected a mapping with a _target_ key")
        extra = (overrides or {}).get(entry._target_, {})
        objects.append(instantiate(entry, **extra))
    return objects

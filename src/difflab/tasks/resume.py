"""Configs taken from checkpoints: ``python src/train.py ckpt_path=<run>/checkpoints/last.ckpt`` resumes from the
checkpoint alone (:func:`resume_config`), and reflow's student takes its teacher's net and data shape
(:func:`teacher_config`).

The checkpoint holds its run's resolved config and the config-group choices that made it
(:class:`difflab.callbacks.RunRecord`). A resumed run takes that config, not the command line's defaults, so the
short command resumes a run started with ``experiment=quickstart net=...``: the original command is not needed, and
a default changed since (a new difflab version) does not change a run half-way. What the command line sets explicitly
still wins, and is reported:

- ``key=value`` (``trainer.max_steps=2000``): set on the stored config;
- a group choice (``logger=wandb``, ``trainer=gpu``): the same choice as the run's is nothing to do; another replaces
  that group's node; a choice of a group that sets keys everywhere (``experiment``, ``scale``, ``debug``,
  ``hparams_search``) other than the run's is an error (it would change the method mid-run: start a new run).

The resumed run writes into its own run dir: ``paths`` are this run's, and every stored value under the source
run's output dir (checkpoint and logger folders) is moved under this run's, so nothing is written into the source
run. A checkpoint from before the choices were recorded resumes with its stored config when the command line names
no config group (the short command), else with the command line's config (the run's original command), as then.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from difflab.utils.stored_config import check_stored_config

log = logging.getLogger(__name__)

OWN_KEYS = ("paths", "ckpt_path", "trust_checkpoint")  # always this run's


def hydra_choices() -> dict[str, Any] | None:
    """The config-group choices of the current Hydra run (what :class:`RunRecord` stores), None outside Hydra."""
    if not HydraConfig.initialized():
        return None
    return {k: v for k, v in HydraConfig.get().runtime.choices.items() if not k.startswith("hydra")}


def task_overrides() -> list[Any]:
    """The command line's overrides, parsed; read unresolved (``model.num_classes=${data_num_classes:}`` is the text
    of an override here, not something to build)."""
    raw = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
    return OverridesParser.create().parse_overrides([str(o) for o in raw])


def _global_group(group: str, choice: str) -> bool:
    """Whether ``conf/<group>/<choice>.yaml`` is a ``# @package _global_`` config (it sets keys anywhere)."""
    sources = HydraConfig.get().runtime.config_sources
    for source in sources:
        if source.get("provider") == "main" and source.get("schema") == "file":
            path = Path(source["path"]) / group / f"{choice}.yaml"
            return path.is_file() and "@package _global_" in path.read_text().split("\n\n")[0]
    return group in ("experiment", "scale", "debug", "hparams_search")


def _move_paths(node: Any, source: str, target: str) -> Any:
    """``node`` with every string under the directory ``source`` moved under ``target``."""
    if isinstance(node, dict):
        return {k: _move_paths(v, source, target) for k, v in node.items()}
    if isinstance(node, list):
        return [_move_paths(v, source, target) for v in node]
    if isinstance(node, str) and (node == source or node.startswith(source.rstrip("/") + "/")):
        return target + node[len(source) :]
    return node


def resume_config(cfg: DictConfig, record: dict[str, Any], where: str) -> tuple[DictConfig, dict[str, Any] | None]:
    """(the config to resume with, its group choices) from the checkpoint's ``record`` (``read_run_record``) and
    the command line's ``cfg``; see the module docstring. ``where``: ``ckpt_path='...'`` for the messages."""
    stored_choices = record.get("choices")
    if not HydraConfig.initialized():  # called from Python with a config: it is the config
        return cfg, hydra_choices()
    if stored_choices is None:  # a checkpoint from before the choices were recorded
        groups = [str(o.input_line) for o in task_overrides() if o.key_or_group in (hydra_choices() or {})]
        if groups:  # the run's original command, as resuming took it then
            log.warning(
                "%s: the checkpoint does not record its config groups: resuming with the command line's config (%s)",
                where,
                " ".join(groups),
            )
            return cfg, hydra_choices()
        log.warning(
            "%s: the checkpoint does not record its config groups: resuming with its stored config; a "
            "config group on the command line would resume with the command line's config instead",
            where,
        )
        stored_choices = {}
    check_stored_config(record["config"], where, "difflab.config")  # everything is built from it
    choices, changes = dict(stored_choices), []
    source = str((record["config"].get("paths") or {}).get("output_dir", ""))
    stored = _move_paths(record["config"], source, str(cfg.paths.output_dir)) if source else record["config"]
    resumed = OmegaConf.create(stored)
    now = hydra_choices() or {}
    for override in task_overrides():
        key = override.key_or_group
        if key in OWN_KEYS or key.split(".")[0] in OWN_KEYS:
            continue
        if key in now:  # a config group
            if stored_choices.get(key) == now[key]:
                continue
            if _global_group(key, str(now[key])):
                raise ValueError(
                    f"{where}: {key}={now[key]} is not the checkpoint's run's {key}={stored_choices.get(key)}; a "
                    f"resumed run keeps its {key} (it sets the method and its sizes). Leave it out to resume, or "
                    f"start a new run without ckpt_path"
                )
            resumed[key] = OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) is not None else None
            choices[key] = now[key]
        elif override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(resumed, parent) if parent else resumed
            if node is not None and leaf in node:
                node.pop(leaf)
        else:
            value = OmegaConf.select(cfg, key)
            if OmegaConf.select(resumed, key) == value:
                continue
            OmegaConf.update(
                resumed,
                key,
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value,
                force_add=True,
            )
        changes.append(str(override.input_line))
    for key in OWN_KEYS:
        resumed[key] = cfg[key]
    log.info(
        "%s: resuming with the checkpoint's run config%s",
        where,
        f"; from the command line: {' '.join(changes)}" if changes else "",
    )
    return resumed, choices


def _explicit(prefix: str) -> bool:
    """Whether the command line sets ``prefix`` (a group choice or a key) or a key under it."""
    if not HydraConfig.initialized():
        return False
    keys = (o.key_or_group for o in task_overrides())
    return any(key == prefix or key.startswith(prefix + ".") for key in keys)


def teacher_config(cfg: DictConfig, record: dict[str, Any], where: str) -> DictConfig:
    """``experiment=reflow model.teacher_ckpt=...``: the student is the teacher's network (its warm start loads the
    teacher's weights) on images of the teacher's shape, so ``cfg`` takes the teacher run's ``net`` (with what its
    experiment set, e.g. quickstart's attention at 4x4) and ``data.image_size``/``data.channels`` from ``record``
    (``read_run_record`` of the teacher), unless the command line sets them; what was taken is logged."""
    taught = record["config"]
    taken = []
    if not _explicit("net") and "net" in taught:
        check_stored_config(taught["net"], where, "difflab.config.net")
        cfg.net = taught["net"]
        taken.append(f"net ({str(taught['net'].get('_target_', '')).rsplit('.', 1)[-1]})")
    for key in ("image_size", "channels"):
        value = (taught.get("data") or {}).get(key)
        if value is not None and not _explicit(f"data.{key}") and key in cfg.data:
            cfg.data[key] = value
            taken.append(f"data.{key}={value}")
    taken += _teacher_model_keys(cfg, taught, where)
    if taken:
        log.info("%s: the student takes the teacher's %s", where, ", ".join(taken))
    return cfg


def _teacher_model_keys(cfg: DictConfig, taught: dict[str, Any], where: str) -> list[str]:
    """The ``model`` keys the student's module class takes from its teacher (its ``teacher_model_keys``, e.g. a
    consistency student's ``schedule``, ``parameterization``, ``num_classes``) unless the command line sets them;
    ``model.schedule`` also replaces the top-level ``schedule`` node it interpolates."""
    target = OmegaConf.select(cfg, "model._target_")
    module_class = get_method(target) if target else None
    taken = []
    for key in getattr(module_class, "teacher_model_keys", ()):
        value = (taught.get("model") or {}).get(key)
        explicit = _explicit(f"model.{key}") or (key == "schedule" and _explicit("schedule"))
        if key not in (taught.get("model") or {}) or explicit:
            continue
        if isinstance(value, dict):  # built from the teacher's file (a schedule, a conditioner): allow-listed only
            check_stored_config(value, where, f"difflab.config.model.{key}")
        if key == "schedule":
            cfg.schedule = value
        cfg.model[key] = value
        taken.append(f"model.{key}")
    return taken

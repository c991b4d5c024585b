"""Which solver of the teacher makes reflow's couplings, checked before anything is generated.

Reflow (Liu et al. 2022) and InstaFlow (Liu et al. 2023) need the pairs (ε_k, x̂_0,k) to be a *deterministic* map of
the noise: x̂_0,k = ODE(ε_k), the probability-flow ODE of a diffusion teacher or a flow's own ODE. A teacher is a
pixel-space :class:`~difflab.modules.DiffusionModule` of a Gaussian (DDPM / iDDPM / DDIM-type, also class-conditional
with CFG) or a rectified-flow process. ``data.teacher_sampler`` names a ``conf/sampler/<name>.yaml`` (``ddim``,
``dpmpp_2m``, ``unipc``, ``heun``, ``ode``, ...; null: the checkpoint's own sampler) and
``data.teacher_sampler_options`` sets its keys (``{eta: 0.0, spacing: trailing}``). The config is read from the
project's own file and allow-listed (:func:`difflab.utils.stored_config.check_stored_config`) before it is built, and
the chain is probed (:func:`difflab.samplers.draws_noise`): a sampler that draws noise after x_T (ancestral DDPM,
DDIM with η > 0, the SDE / Langevin / predictor-corrector solvers, EDM's churn, Analytic-DPM's variance) is refused.

Convention: the pairs' noise ε_k is the teacher's x_T. A VP diffusion starts from x_T ~ N(0, I) (ᾱ_T ≈ 0), a flow
from x_1 = ε (τ = 1 is pure noise), so the same ε is both the teacher's start and the student flow's τ = 1 end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import get_method, instantiate
from omegaconf import OmegaConf

from difflab.samplers import Sampler, draws_noise
from difflab.utils.help import CONF
from difflab.utils.stored_config import check_stored_config

SAMPLER_DIR = CONF / "sampler"
TEACHER_MODULES = {"difflab.modules.DiffusionModule"}
PROCESSES = {"difflab.schedules.GaussianDiffusion": "gaussian", "difflab.schedules.RectifiedFlow": "flow"}
ODE_SOLVERS = {
    "gaussian": "ddim (eta 0) | dpmpp_2m | dpmpp_3m | unipc | heun | euler | plms | ode",
    "flow": "flow_euler | flow_heun | flow_ode",
}


def sampler_preset(name: Any, key: str = "data.teacher_sampler", folder: Path = SAMPLER_DIR) -> dict[str, Any]:
    """``conf/sampler/<name>.yaml`` as a plain dict (a ``defaults`` entry naming a sibling file, as pndm's plms, is
    merged under it), its ``_target_`` allow-listed. ``name`` must be one of the folder's file names (no paths)."""
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"{key}={name!r}: expected the name of a conf/sampler file: {', '.join(names)}")
    own = OmegaConf.load(folder / f"{name}.yaml")
    merged = OmegaConf.create()
    for base in own.pop("defaults", None) or []:
        if base != "_self_":
            merged = OmegaConf.merge(merged, sampler_preset(base, key, folder))
    content = OmegaConf.to_container(OmegaConf.merge(merged, own))
    check_stored_config(content, f"{key}={name!r} (conf/sampler/{name}.yaml)", "sampler")
    return content


def check_teacher(model_cfg: dict[str, Any], where: str) -> str:
    """The teacher's process (``gaussian`` | ``flow``) from its run config's ``model`` section (allow-listed first);
    a latent, σ-process (EDM) or few-step model is refused, naming what is accepted."""
    check_stored_config(model_cfg, where, "difflab.config.model")
    target = str(model_cfg.get("_target_", ""))
    schedule = str((model_cfg.get("schedule") or {}).get("_target_", ""))
    if "Latent" in target:  # its pairs would be latents, not images
        kind = "rectified flow" if PROCESSES.get(schedule) == "flow" else "diffusion model"
        raise ValueError(
            f"{where}: a latent {kind} ({target.rsplit('.', 1)[-1]}); reflow here trains a pixel-space student on "
            "the teacher's images, and a latent teacher's ODE ends in latents: use a pixel-space teacher "
            "(python src/train.py model=rectified_flow | ddpm | iddpm | cfg)"
        )
    if target not in TEACHER_MODULES or schedule not in PROCESSES:
        raise ValueError(
            f"{where}: a {target.rsplit('.', 1)[-1]} with the process {schedule.rsplit('.', 1)[-1] or '?'}; reflow's "
            "teacher is a DiffusionModule of a Gaussian diffusion (model=ddpm | iddpm | cfg) or a rectified flow "
            "(model=rectified_flow)"
        )
    return PROCESSES[schedule]


def teacher_sampler_config(
    trained: dict[str, Any], name: str | None, options: dict[str, Any] | None, key: str = "data.teacher_sampler"
) -> dict[str, Any] | None:
    """The sampler config of the pairs: None when neither ``name`` nor ``options`` is set (the checkpoint's own sampler,
    ``trained``, unchanged); else the preset ``name`` (or ``trained`` when null) with ``options`` set on it. An option
    the sampler does not take is an error naming it."""
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"{key}_options={options!r}: expected a mapping of sampler settings, e.g. {{eta: 0.0}}")
    options = dict(options or {})
    if name is None and not options:
        return None
    where = f"{key}_options"
    hidden = sorted(k for k in options if str(k).startswith("_"))
    if hidden:
        raise ValueError(f"{where}.{hidden[0]}: not a sampler setting (choose the sampler with {key}=<name>)")
    base = sampler_preset(name, key) if name is not None else dict(trained)
    sampler_class = get_method(base["_target_"])
    accepted = sampler_class.setting_names() if issubclass(sampler_class, Sampler) else set()
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise ValueError(
            f"{where}.{unknown[0]}: {sampler_class.__name__} has no such setting; its settings: "
            f"{', '.join(sorted(accepted))}"
        )
    config = OmegaConf.to_container(OmegaConf.merge(base, options))
    check_stored_config(config, f"{key}={name!r}, {where}", "sampler")  # a nested _target_ in the options too
    return config


def check_deterministic(
    model_cfg: dict[str, Any], sampler_cfg: dict[str, Any], steps: int | None, process: str, where: str
) -> None:
    """Build ``sampler_cfg`` on the teacher's process (``model_cfg``: its checked run config) and refuse it when its
    chain of ``steps`` steps draws noise after x_T (:func:`draws_noise`, with a zero network: no weights needed)."""
    name = sampler_cfg["_target_"].rsplit(".", 1)[-1]
    fix = f"choose an ODE solver: data.teacher_sampler={ODE_SOLVERS[process]}"
    if str(sampler_cfg.get("variance_type")).lower() == "analytic":
        raise ValueError(
            f"{where}: {name} with variance_type=analytic adds Analytic-DPM's optimal variance as fresh noise at "
            f"every step; reflow's couplings must be a deterministic map of the noise: {fix}"
        )
    variance = str(model_cfg.get("variance_type", "fixed_small"))
    channels, height, width = (int(s) for s in model_cfg["image_shape"])
    out_channels = channels * (2 if variance == "learned_range" else 1)
    try:  # a sampler of another process, a setting out of range, too many steps: named by the sampler
        sampler = instantiate(sampler_cfg)(
            diffusion=instantiate(model_cfg["schedule"]),
            parameterization=model_cfg.get("parameterization", "eps"),
            model_variance_type=variance,
        )
        stochastic = draws_noise(sampler, (channels, height, width), out_channels, steps)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    if stochastic:
        raise ValueError(
            f"{where}: {name} draws fresh noise during its chain, so its x̂_0 is not a function of the starting "
            f"noise ε; reflow's couplings (ε, x̂_0) must be a deterministic map of the noise (the teacher's ODE): "
            f"{fix}"
        )


def choose_sampler(
    model_cfg: dict[str, Any], process: str, name: str | None, options: Any, steps: int | None, where: str
) -> dict[str, Any] | None:
    """``data.teacher_sampler`` / ``_options`` (a DictConfig from Hydra, or a dict) resolved against the teacher's run
    config (:func:`teacher_sampler_config`; None: its own sampler) and checked deterministic at ``steps``
    (:func:`check_deterministic`); ``where`` names the teacher in the messages."""
    if OmegaConf.is_config(options):
        options = OmegaConf.to_container(options, resolve=True)
    config = teacher_sampler_config(model_cfg["sampler"], name, options)
    chosen = f"data.teacher_sampler={name!r}" if name else "the teacher's own sampler"
    where = f"{chosen}, data.teacher_steps={steps} ({where})"
    check_deterministic(model_cfg, config or model_cfg["sampler"], steps, process, where)
    return config

"""``python src/export.py ckpt=PATH format=diffusers|safetensors|feature_net out=DIR``: a trained checkpoint in
another format (the one export command).

- ``diffusers``: a ``DDPMPipeline`` folder (``difflab.tasks.export_diffusers``): ``DDPMPipeline.from_pretrained``
  / ``DDIMPipeline.from_pretrained`` load it and sample our model; a class-conditional UNet or a DiT
  (``DiTTransformer2DModel``, ``difflab.tasks.export_dit``) as its parts with a README.md holding the sampling loop
  (``approximate=true``: a DiT trained with DiT's timestep frequencies, see there).
- ``safetensors``: ``model.safetensors`` (the network's weights as sampled: EMA when trained with it) and
  ``config.json`` (the run's resolved config, which rebuilds the net: ``instantiate(config["net"])``).
- ``feature_net``: a ``ClassifierModule`` checkpoint as a shipped FID/IS feature network
  (``difflab.tasks.feature_net_export``; ``name=`` and ``command=`` recorded with it, ``out`` defaults to
  ``difflab/metrics/weights/``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from difflab.modules import load_module
from difflab.utils.checkpoint_io import trusted_checkpoints

log = logging.getLogger(__name__)
FORMATS = ("diffusers", "safetensors", "feature_net")


def export_safetensors(module: Any, record: dict[str, Any], out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in module.net.state_dict().items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt", "producer": "difflab"})
    (out / "config.json").write_text(json.dumps(record.get("config") or {}, indent=2, default=str))
    return out


def export(cfg: DictConfig) -> dict[str, str]:
    """Export ``cfg.ckpt`` as ``cfg.format`` into ``cfg.out``; returns the folder (or file) written."""
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r}: expected one of {list(FORMATS)}")
    if cfg.format == "feature_net":
        from difflab.tasks.feature_net_export import WEIGHTS_DIR
        from difflab.tasks.feature_net_export import export as export_feature_net

        if not cfg.get("name") or not cfg.get("command"):
            raise ValueError("format=feature_net needs name=<feature net name> and command='<training command>'")
        out_dir = Path(cfg.out) if cfg.get("out") else WEIGHTS_DIR
        meta = export_feature_net(cfg.ckpt, cfg.name, cfg.command, out_dir)
        log.info("Feature net %s (test accuracy %.4f): %s", cfg.name, meta["test_accuracy"], out_dir)
        return {"out": str(out_dir / f"{cfg.name}.pt")}
    if not cfg.get("out"):
        raise ValueError(f"format={cfg.format}: out=<folder> is required")
    with trusted_checkpoints(cfg.get("trust_checkpoint", False)):
        module, record = load_module(cfg.ckpt)
    out = Path(cfg.out)
    if cfg.format == "diffusers":
        from difflab.tasks.export_diffusers import export_diffusers

        export_diffusers(module, record, out, approximate=bool(cfg.get("approximate", False)))
    else:
        export_safetensors(module, record, out)
    log.info("Exported %s as %s: %s", cfg.ckpt, cfg.format, out)
    return {"out": str(out)}

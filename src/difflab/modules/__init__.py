"""LightningModules (``*Module``) and checkpoint loading."""

from difflab.modules.checkpoint import CheckpointError, load_module, read_run_record
from difflab.modules.classifier import ClassifierModule
from difflab.modules.diffusion import DiffusionModule

__all__ = ["CheckpointError", "ClassifierModule", "DiffusionModule", "load_module", "read_run_record"]

"""LightningModules (``*Module``) and checkpoint loading."""

from difflab.modules.autoencoder import AutoencoderModule, export_autoencoder, load_autoencoder
from difflab.modules.checkpoint import CheckpointError, load_module, read_run_record, sampler_config
from difflab.modules.classifier import ClassifierModule
from difflab.modules.consistency import ConsistencyModule
from difflab.modules.diffusion import DiffusionModule
from difflab.modules.edm import EDMModule
from difflab.modules.latent_consistency import LatentConsistencyModule
from difflab.modules.latent_diffusion import LatentDiffusionModule
from difflab.modules.noisy_classifier import NoisyClassifierModule
from difflab.modules.progressive import ProgressiveDistillationModule
from difflab.modules.upscaler import UpscalerModule

__all__ = [
    "AutoencoderModule",
    "CheckpointError",
    "ClassifierModule",
    "ConsistencyModule",
    "DiffusionModule",
    "EDMModule",
    "LatentConsistencyModule",
    "LatentDiffusionModule",
    "NoisyClassifierModule",
    "ProgressiveDistillationModule",
    "UpscalerModule",
    "export_autoencoder",
    "load_autoencoder",
    "load_module",
    "read_run_record",
    "sampler_config",
]

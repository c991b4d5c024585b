"""Plain ``nn.Module`` networks (never import Lightning)."""

from difflab.networks.classifier import ClassifierNet
from difflab.networks.embeddings import timestep_embedding
from difflab.networks.unet import UNet

__all__ = ["ClassifierNet", "UNet", "timestep_embedding"]

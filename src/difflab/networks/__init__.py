"""Plain ``nn.Module`` networks (never import Lightning)."""

from difflab.networks.attention import SpatialTransformer
from difflab.networks.autoencoder import Autoencoder
from difflab.networks.classifier import ClassifierNet
from difflab.networks.conditioners import ClassConditioner, Conditioner, TextTransformerConditioner
from difflab.networks.discriminator import PatchDiscriminator
from difflab.networks.dit import DiT
from difflab.networks.embeddings import timestep_embedding
from difflab.networks.unet import UNet

__all__ = [
    "Autoencoder",
    "ClassConditioner",
    "ClassifierNet",
    "Conditioner",
    "DiT",
    "PatchDiscriminator",
    "SpatialTransformer",
    "TextTransformerConditioner",
    "UNet",
    "timestep_embedding",
]

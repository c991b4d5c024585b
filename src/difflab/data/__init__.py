"""Data modules: batches ``(x, y)`` with x float32 (B, C, S, S) in [-1, 1] and y int64 (B,) labels."""

from difflab.data.base import ImageDataModule
from difflab.data.cifar10 import CIFAR10DataModule
from difflab.data.errors import CorruptImageError, DatasetNotFoundError
from difflab.data.idx import read_idx, write_idx
from difflab.data.image_folder import ImageFolderDataModule
from difflab.data.latents import LatentDataModule
from difflab.data.mnist import FashionMNISTDataModule, MNISTDataModule
from difflab.data.pairs import PairsDataModule, generate_pairs
from difflab.data.small import DigitsDataModule, MNIST5kDataModule
from difflab.data.streaming import StreamingDataModule

__all__ = [
    "CIFAR10DataModule",
    "CorruptImageError",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "LatentDataModule",
    "MNIST5kDataModule",
    "MNISTDataModule",
    "PairsDataModule",
    "StreamingDataModule",
    "generate_pairs",
    "read_idx",
    "write_idx",
]

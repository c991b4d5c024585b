"""difflab: an experiment platform for diffusion models (PyTorch Lightning + Hydra)."""

__version__ = "0.1.0"

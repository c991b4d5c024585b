"""k-diffusion's reference functions (``k_diffusion.sampling``, ``k_diffusion.layers``, ``k_diffusion.utils``) without
its package ``__init__``, which imports its training stack (CLIP, clean-fid, kornia, accelerate, wandb) and pins numpy
below 2. The Makefile installs ``k-diffusion`` and ``dctorch`` with ``--no-deps`` for this; the modules used here need
only torch, scipy, einops, torchdiffeq and torchsde."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def k_diffusion(module: str) -> types.ModuleType:
    """``k_diffusion.<module>``, skipping the test where k-diffusion is not installed."""
    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            pytest.skip("k-diffusion is not installed (make install: pip install --no-deps k-diffusion)")
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    return importlib.import_module(f"k_diffusion.{module}")

"""Content hashes that identify weights and configs whatever file or device they came from (the latent cache's
autoencoder, a distilled model's teacher, the Analytic-DPM moments' model)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's weights: every state-dict entry in sorted name order, as its name, dtype, shape and the
    bytes of its CPU copy. Equal weights give equal hashes whatever device or file they came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(json.dumps([name, str(flat.dtype), list(tensor.shape)]).encode() + b"\0")
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

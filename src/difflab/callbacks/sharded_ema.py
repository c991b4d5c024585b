"""The EMA of a sharded model (``trainer=fsdp``): each process averages only its own shards.

Lightning's ``WeightAveraging`` keeps an ``AveragedModel``, a deep copy of the whole module made in ``setup``, before
the strategy shards it: under FSDP every process would hold the full EMA (2.7 GB for DiT-XL/2) and the update would
read unsharded weights. Here the average is one tensor per trainable parameter, a clone of the sharded parameter
(same mesh and placements, so 1/world_size of it per process), and each operation is local: the update is one
``torch._foreach_lerp_`` over the local shards (no communication, no gather), the swap for validation and the copy
at the end of fit exchange local shards. The checkpoint layout is ``WeightAveraging``'s: EMA weights in
``state_dict``, the raw ones in ``current_model_state``, the update count in ``averaging_state`` — as sharded
tensors, which :class:`difflab.strategies.FSDPStrategy` writes and reads piece by piece.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedAverage:
    """EMA tensors of ``module``'s trainable parameters, sharded as the parameters are. The update count is the
    EMA callback's (:class:`difflab.callbacks.EMA`), passed in."""

    def __init__(self, module: nn.Module) -> None:
        with torch.no_grad():
            self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
            self.average = {name: p.detach().clone() for name, p in self.params.items()}

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        names = list(self.params)
        return [_local(self.average[n]) for n in names], [_local(self.params[n].data) for n in names]

    @torch.no_grad()
    def update(self, weight: float, first: bool) -> None:
        """θ_ema ← θ_ema + weight (θ − θ_ema) on the local shards; the ``first`` update copies."""
        average, current = self._pairs()
        if first:
            torch._foreach_copy_(average, current)
        else:
            torch._foreach_lerp_(average, current, weight)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange EMA and raw weights (validation uses the EMA ones)."""
        average, current = self._pairs()
        saved = [a.clone() for a in average]
        torch._foreach_copy_(average, current)
        torch._foreach_copy_(current, saved)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        average, current = self._pairs()
        torch._foreach_copy_(current, average)

    def save(self, checkpoint: dict[str, Any], n_averaged: int) -> None:
        """``WeightAveraging``'s layout: the module state (sharded) moves to ``current_model_state``, ``state_dict``
        gets the EMA tensors in place of the trainable parameters."""
        current = checkpoint["state_dict"]
        checkpoint["current_model_state"] = current
        checkpoint["state_dict"] = {name: self.average.get(name, value) for name, value in current.items()}
        checkpoint["averaging_state"] = {"n_averaged": torch.tensor(n_averaged)}

    @torch.no_grad()
    def load(self, checkpoint: dict[str, Any]) -> int:
        """The EMA tensors from ``state_dict`` (this process's shards, as the strategy loaded them); the raw weights
        are already in the model (the strategy loads ``current_model_state``). Returns the stored update count."""
        stored = checkpoint["state_dict"]
        for name, average in self.average.items():
            _local(average).copy_(_local(stored[name]))
        return int(checkpoint.get("averaging_state", {}).get("n_averaged", 0))

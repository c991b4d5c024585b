"""``trainer=fsdp``: fully sharded data parallel training (FSDP2, ``torch.distributed.fsdp.fully_shard``) through
Lightning's ``ModelParallelStrategy``, with difflab's sharded checkpoints.

Every process holds 1/world_size of each trainable parameter, of its gradient, of the optimizer state and of the EMA
(:mod:`difflab.callbacks.sharded_ema`); a unit's full parameters are gathered just before it runs and freed after
(``reshard_after_forward``). The units are the network's ``shard_units()`` (every DiT block; every UNet block),
then each trainable child module of the LightningModule as a whole (the net's embeddings and output layers, a
conditioner). Frozen parts (latent diffusion's autoencoder) stay whole on every process. The data are split across
processes as under DDP, so with the same seed and batches the loss curve equals DDP's to float tolerance (tested).

What Lightning's strategy gives unchanged: the device mesh, the process group (gloo on CPU, NCCL on GPU), the
launch, gradient clipping over DTensors. What this class adds: a 1-D data-parallel mesh over all processes of all
nodes, the sharding plan and mixed-precision policy (``param_dtype``/``reduce_dtype``: e.g. bf16 compute with fp32
gradient reduction, master weights in fp32), and checkpoints in :mod:`difflab.utils.sharded_checkpoint`'s format
(atomic, safetensors, resumable on another number of processes) instead of DCP's.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from difflab.utils.checkpoint_io import load_checkpoint
from difflab.utils.sharded_checkpoint import (
    ShardedCheckpointReader,
    as_shard,
    is_sharded_checkpoint,
    remove_sharded_checkpoint,
    save_sharded_checkpoint,
    shard_box,
)

_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(key: str, value: str | None) -> torch.dtype | None:
    if value not in _DTYPES:
        raise ValueError(f"trainer.strategy.{key}={value!r}: expected one of {sorted(k for k in _DTYPES if k)} or null")
    return _DTYPES[value]


class FSDPStrategy(ModelParallelStrategy):
    """FSDP2 over all processes, with difflab's sharding plan, mixed precision and checkpoints.

    Args:
        param_dtype: dtype of the gathered parameters the forward/backward compute with (null: the parameters'
            own, fp32); the sharded master weights and the optimizer stay fp32. Needs ``trainer.precision``
            ``bf16-mixed`` (autocast casts the networks' fp32 embeddings to it).
        reduce_dtype: dtype of the gradient reduce-scatter (null: param_dtype).
        reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3); false keeps them
            until the backward (ZeRO-2-like: fewer all-gathers, more memory).
        timeout_s: the process group's timeout.
    """

    def __init__(
        self,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        reshard_after_forward: bool = True,
        timeout_s: float = 1800.0,
    ) -> None:
        super().__init__(save_distributed_checkpoint=True, timeout=timedelta(seconds=timeout_s))
        self.mp_policy = MixedPrecisionPolicy(
            param_dtype=_dtype("param_dtype", param_dtype), reduce_dtype=_dtype("reduce_dtype", reduce_dtype)
        )
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        # all processes of all nodes in one data-parallel dimension (Lightning's default splits nodes and devices
        # into data- and tensor-parallel dimensions)
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        if not is_overridden("configure_model", self.lightning_module):
            raise ValueError(
                f"trainer=fsdp: {type(self.lightning_module).__name__} cannot be sharded; FSDP trains the diffusion "
                "models (model=ddpm, iddpm, cfg, edm, ldm, rectified_flow, ...): use trainer=ddp for this one"
            )
        mixed = str(trainer.precision).endswith("-mixed")
        if self.mp_policy.param_dtype is not None and not mixed:
            raise ValueError(
                f"trainer.strategy.param_dtype={str(self.mp_policy.param_dtype).removeprefix('torch.')} needs "
                f"trainer.precision=bf16-mixed (or 16-mixed), not {trainer.precision}: the networks' own fp32 tensors "
                "(timestep and position embeddings) meet the 16-bit weights, and autocast casts them"
            )
        super().setup(trainer)

    # ------------------------------------------------------------------ sharding
    def parallelize(self, module: nn.Module) -> None:
        """Shard ``module``'s trainable children in place (each ``shard_units()`` unit, then the child); a second
        call (Lightning calls ``configure_model`` again for a validation after fit) does nothing."""
        if any(isinstance(p, DTensor) for p in module.parameters()):
            return
        options = {
            "mesh": self.device_mesh["data_parallel"],
            "mp_policy": self.mp_policy,
            "reshard_after_forward": self.reshard_after_forward,
        }
        for child in module.children():
            if not any(p.requires_grad for p in child.parameters()):
                continue  # frozen (an autoencoder) or parameter-free (a schedule): whole on every process
            for unit in getattr(child, "shard_units", list)():
                fully_shard(unit, **options)
            fully_shard(child, **options)
        whole = [name for name, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
        if whole:
            raise ValueError(
                f"trainer=fsdp: {type(module).__name__} has trainable parameters outside its child modules "
                f"({', '.join(whole[:5])}), which FSDP cannot shard: move them into a submodule"
            )
        count = sum(p.numel() for p in module.parameters() if isinstance(p, DTensor))
        rank_zero_info(f"FSDP: {count:,} trainable parameters sharded over {self.world_size} processes")

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        save_sharded_checkpoint(checkpoint, Path(self.broadcast(str(filepath))), self.global_rank, self.world_size)

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            remove_sharded_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Load model and optimizer state into the sharded model (from a sharded checkpoint written by any number of
        processes, or from an ordinary one) and return the checkpoint, its model states as this process's shards
        (``state_dict``: the EMA weights when trained with EMA; ``current_model_state``: the raw ones)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        source = _CheckpointSource(path)
        checkpoint = source.meta
        template = get_model_state_dict(self.model)
        for key in ("state_dict", "current_model_state"):
            if key in checkpoint:
                checkpoint[key] = {name: source.tensor((key, name), like) for name, like in template.items()}
        weights = checkpoint.get("current_model_state", checkpoint["state_dict"])
        strict = self.lightning_module.strict_loading
        set_model_state_dict(self.model, weights, options=StateDictOptions(strict=strict))
        for i, optimizer in enumerate(self.optimizers):
            state = source.optimizer_state(i, self.model, optimizer)
            if state is not None:
                set_optimizer_state_dict(self.model, optimizer, state)
        return checkpoint


class _CheckpointSource:
    """A checkpoint to restore a sharded model from: a sharded one (read piece by piece, whatever number of processes
    wrote it) or an ordinary file (``trainer=ddp`` or one device: read whole, each process taking its shard)."""

    def __init__(self, path: Path) -> None:
        self.reader = None
        if is_sharded_checkpoint(path):
            self.reader = ShardedCheckpointReader(path, lambda p: load_checkpoint(p, "ckpt_path"), "ckpt_path")
            self.meta = self.reader.meta
        else:
            self.meta = load_checkpoint(path, "ckpt_path")

    @property
    def by_name(self) -> bool:
        """Whether the optimizer state is keyed by parameter name (a sharded checkpoint's), else by index."""
        return self.reader is not None

    def _stored(self, path: tuple[Any, ...]) -> Any:
        value = self.meta
        for key in path:
            value = value[key]
        return value

    def tensor(self, path: tuple[Any, ...], like: Any) -> Any:
        """The tensor at ``path``: this process's shard when ``like`` is a DTensor, else as stored."""
        if not isinstance(like, DTensor):
            return self._stored(path)
        if self.reader is not None:
            return self.reader.read_like(path, like)
        return shard_like(self._stored(path), like, f"ckpt_path: {'/'.join(map(str, path))}")

    def optimizer_state(self, index: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer's state keyed by parameter name (``set_optimizer_state_dict``'s layout), each state tensor
        of a sharded parameter as this process's shard."""
        stored = self.meta.get("optimizer_states", [])
        if index >= len(stored):
            return None
        params = dict(model.named_parameters())
        groups = stored[index]["param_groups"]
        if not self.by_name:  # torch's layout: parameters numbered in the optimizer's order
            names = {id(p): n for n, p in params.items()}
            order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
            groups = [{**g, "params": [order[i] for i in g["params"]]} for g in groups]
        state = {}
        for key, entries in stored[index]["state"].items():
            name = key if self.by_name else order[key]
            state[name] = {
                k: self.tensor(("optimizer_states", index, "state", key, k), params[name])
                if isinstance(v, str) or (torch.is_tensor(v) and v.shape == params[name].shape)
                else v
                for k, v in entries.items()
            }
        return {"state": state, "param_groups": groups}


def shard_like(full: torch.Tensor, like: DTensor, where: str) -> DTensor:
    """This process's shard of the whole tensor ``full``, sharded as ``like``."""
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"{where}: shape {list(full.shape)}, expected {list(like.shape)}")
    offset, shape = shard_box(like)
    return as_shard(full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))], like)


def is_sharded_strategy(strategy: Any) -> bool:
    """Whether the model's parameters are sharded across processes under ``strategy`` (Lightning's
    ``ModelParallelStrategy`` and ours): every process then takes part in each forward (a collective)."""
    return isinstance(strategy, ModelParallelStrategy)

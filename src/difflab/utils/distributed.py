"""Sampling across the processes of a ``torchrun`` launch: each rank draws its share of the samples with its own seed,
and the shares are gathered once, in the original order, on every rank (rank 0 writes them).

Lightning's strategies cover training; a plain sampling script launched by torchrun has no Trainer, so these few
collectives are ours.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun sets it); return this rank's device
    (``cuda:LOCAL_RANK`` on GPUs). NCCL for CUDA, gloo on CPU. A no-op for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[torch.device]:
    """:func:`init_from_env` for the block, and the group it joined destroyed at the end: a group left to the
    interpreter's exit can abort the process (gloo's threads: "terminate called without an active exception", exit
    code -6, seen on a torchrun launch that had written its samples)."""
    joining = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        yield init_from_env(device)
    finally:
        if joining and dist.is_initialized():
            dist.destroy_process_group()


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(num: int, rank: int, world: int) -> torch.Tensor:
    """Indices (of ``num`` samples) drawn by ``rank``: every world-th one, so shares differ by at most one."""
    return torch.arange(rank, num, world)


def gather_shards(local: torch.Tensor, num: int) -> torch.Tensor:
    """The ``num`` samples (num, ...) from every rank's ``local`` share (len(shard(num, rank, world)), ...), in the
    original order. Shares are padded to equal length for ``all_gather``. Identity for a single process."""
    rank, world = rank_world()
    if world == 1:
        return local
    per_rank = -(-num // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    full = local.new_empty((num, *local.shape[1:]))
    for r, part in enumerate(parts):
        index = shard(num, r, world)
        full[index.to(full.device)] = part[: index.numel()]
    return full

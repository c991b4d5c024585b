"""Lightning strategies of difflab: ``FSDPStrategy`` (``trainer=fsdp``, sharded models and checkpoints)."""

from difflab.strategies.fsdp import FSDPStrategy, is_sharded_strategy

__all__ = ["FSDPStrategy", "is_sharded_strategy"]

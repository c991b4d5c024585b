"""Starting a network from another run's weights (reflow: the student starts as its teacher)."""

from __future__ import annotations

from torch import nn

from difflab.utils.checkpoint_io import CheckpointError, load_checkpoint


def load_net_weights(net: nn.Module, path: str, key: str) -> None:
    """Copy the ``net.*`` weights of the difflab checkpoint at ``path`` (its EMA weights when EMA was on) into ``net``;
    a file of another architecture is an error naming ``key``."""
    checkpoint = load_checkpoint(path, key)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if state is None:
        raise CheckpointError(f"{key}={path!r}: not a difflab checkpoint (no 'state_dict'; written by src/train.py)")
    weights = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    own = net.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [k for k in set(own) & set(weights) if own[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{key}={path!r}: its network does not match this model's net (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {shapes[:3]}); give the student the teacher's net settings"
        )
    net.load_state_dict(weights)

"""Starting a network from another run's weights (reflow: the student starts as its teacher, a flow or a diffusion
model's ε-, x_0- or v-network: the student's first steps adapt it to the velocity)."""

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
    if shapes and _learned_variance(checkpoint):
        raise CheckpointError(
            f"{key}={path!r}: the teacher learns its variance (model.variance_type=learned_range), so its network "
            "outputs 2C channels (ε̂ and the variance's interpolation v) where this student's outputs C. The warm "
            "start copies a whole network and does not cut the output layer in half (its rows are laid out per net: "
            "channel-major in the UNet's last convolution, (p, p, C)-major in the DiT's decoder). Train the student "
            f"from a fresh network on the teacher's couplings: model.teacher_ckpt=null data.teacher_ckpt={path} with "
            "the teacher's net=... and data.image_size=..."
        )
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{key}={path!r}: its network does not match this model's net (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, other shapes {shapes[:3]}); give the student the teacher's net settings"
        )
    net.load_state_dict(weights)


def _learned_variance(checkpoint: dict) -> bool:
    """Whether the run config of a difflab checkpoint has a learned variance (``model.variance_type``)."""
    model = ((checkpoint.get("difflab") or {}).get("config") or {}).get("model") or {}
    return str(model.get("variance_type", "")).lower() == "learned_range"

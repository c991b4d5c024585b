"""FID, KID and IS on one feature network, with real-image statistics computed once and cached on disk.

Distributed use: call :meth:`update_fake` (and :meth:`update_real`) on every rank, then :meth:`compute` on every
rank — torchmetrics all-reduces the states inside ``compute``; calling it on one rank only hangs the others.
Cached real statistics are split across ranks so the reduced result equals the single-process one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from difflab.metrics import feature_nets
from difflab.metrics.feature_nets import make_metric, to_metric_input
from difflab.utils.checkpoint_io import load_checkpoint
from difflab.utils.paths import atomic_write

log = logging.getLogger(__name__)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GenerativeMetrics(nn.Module):
    """``metrics`` ⊆ {fid, kid, is} on ``feature_net``; results are named ``<metric>_<feature_net>``."""

    def __init__(
        self,
        metrics: Sequence[str] = ("fid", "kid", "is"),
        feature_net: str = "fmnist_cls",
        inception_weights: str | None = None,
        kid_subset_size: int = 100,
        is_splits: int = 1,
    ) -> None:
        super().__init__()
        self.names, self.feature_net = [m.lower() for m in metrics], feature_net
        extra = {
            "fid": {"reset_real_features": False},
            "kid": {"reset_real_features": False, "subset_size": kid_subset_size},
            "is": {"splits": is_splits},
        }
        self.metrics = nn.ModuleDict(
            {name: make_metric(name, feature_net, inception_weights, **extra[name]) for name in self.names}
        )
        self._real_ready = False  # on ranks > 0 the FID real sums are zero by design: track readiness here

    @property
    def needs_real(self) -> bool:
        return any(name in self.metrics for name in ("fid", "kid"))

    def num_real(self) -> int:
        if "fid" in self.metrics:
            return int(self.metrics["fid"].real_features_num_samples)
        return sum(len(f) for f in self.metrics["kid"].real_features) if "kid" in self.metrics else 0

    @torch.no_grad()
    def update_real(self, images: torch.Tensor) -> None:
        """Real images in [-1, 1], (B, C, H, W)."""
        x = to_metric_input(images, self.feature_net)
        for name in ("fid", "kid"):
            if name in self.metrics:
                self.metrics[name].update(x, real=True)

    @torch.no_grad()
    def update_fake(self, images: torch.Tensor) -> None:
        """Generated images in [-1, 1], (B, C, H, W)."""
        x = to_metric_input(images, self.feature_net)
        for name, metric in self.metrics.items():
            metric.update(x, real=False) if name != "is" else metric.update(x)

    def compute(self) -> dict[str, float]:
        """All metrics (call on every rank), then reset the generated-image states (the real ones are kept)."""
        out: dict[str, float] = {}
        for name, metric in self.metrics.items():
            with torch.random.fork_rng(devices=[]):  # KID and IS draw random subsets: same draw on every rank
                torch.manual_seed(0)
                value = metric.compute()
            if isinstance(value, tuple):  # KID and IS return (mean, std)
                out[f"{name}_{self.feature_net}"] = float(value[0])
                if torch.isfinite(value[1]):  # undefined with a single IS split
                    out[f"{name}_std_{self.feature_net}"] = float(value[1])
            else:
                out[f"{name}_{self.feature_net}"] = float(value)
            metric.reset()
        return out

    # ------------------------------------------------------------------ real statistics cache
    def real_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        if "fid" in self.metrics:
            fid = self.metrics["fid"]
            for key in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"):
                state[f"fid.{key}"] = getattr(fid, key).detach().cpu()
        if "kid" in self.metrics:
            state["kid.real_features"] = torch.cat(self.metrics["kid"].real_features).cpu()
        return state

    def load_real_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load cached real statistics: FID sums on rank 0 only (the others zero), KID features split by rank."""
        rank, world = _rank_world()
        if "fid" in self.metrics:
            fid = self.metrics["fid"]
            for key in ("real_features_sum", "real_features_cov_sum", "real_features_num_samples"):
                value = state[f"fid.{key}"].to(getattr(fid, key).device)
                setattr(fid, key, value if rank == 0 else torch.zeros_like(value))
        if "kid" in self.metrics:  # contiguous blocks: all_gather's concatenation restores the original order
            features = state["kid.real_features"].tensor_split(world)[rank]
            self.metrics["kid"].real_features = [features.to(self.metrics["kid"].device)]
        self._real_ready = True

    def fill_real(
        self,
        batches: Iterable[torch.Tensor],
        num_real: int,
        cache_key: dict[str, Any] | None,
        cache_dir: str | Path | None,
    ) -> bool:
        """Make sure real statistics of ``num_real`` images are present: from the cache when its key matches,
        else from ``batches`` (then cached by rank 0). Returns True when they came from the cache.

        Under DDP every rank must pass the same, full ``batches`` (no distributed sampler): each computes the whole
        statistics, then keeps its share (see :meth:`load_real_state`) so the all-reduce in ``compute`` is exact.
        """
        if not self.needs_real or self._real_ready:
            return False
        path = None
        if cache_dir is not None and cache_key is not None:
            key = {**cache_key, "feature_net": self.feature_net, "num_real": num_real, "metrics": sorted(self.names)}
            path = Path(cache_dir) / f"{stats_key(key)}.pt"
            if path.is_file():
                self.load_real_state(load_checkpoint(path, "cache_dir"))
                return True
        seen = 0
        for images in batches:
            images = images[: num_real - seen]
            self.update_real(images)
            seen += images.shape[0]
            if seen >= num_real:
                break
        state = self.real_state()
        self.load_real_state(state)
        if path is not None and _rank_world()[0] == 0:
            try:
                with atomic_write(path) as file:  # a reader never sees a partial file, a failure leaves none
                    torch.save(state, file)
            except OSError as err:  # the statistics are computed: a cache that cannot be written only costs time
                log.warning("cache_dir: the real statistics were not cached (%s)", err)
        return False


# data config keys that change how batches are loaded, never which images: left out of the statistics cache key
LOADER_ONLY_DATA_KEYS = frozenset(
    {"batch_size", "num_workers", "pin_memory", "persistent_workers", "on_device", "download", "verify"}
)


def stats_key(key: dict[str, Any]) -> str:
    """A short hash of what the real statistics depend on (data config, resolution, feature net and its weights,
    number of images): changing any of them invalidates the cache."""
    net = key.get("feature_net")
    weights = feature_nets.WEIGHTS_DIR / f"{net}.pt"
    payload = dict(key)
    if isinstance(payload.get("data"), Mapping):  # how the images are loaded does not change which images they are
        payload["data"] = {k: v for k, v in payload["data"].items() if k not in LOADER_ONLY_DATA_KEYS}
    if weights.is_file():
        payload["weights_sha"] = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]

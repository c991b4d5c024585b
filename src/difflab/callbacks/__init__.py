"""Lightning callbacks: EMA, checkpoints, run record, per-rank seeds, sample grids, metrics, throughput."""

from difflab.callbacks.checkpoint import ModelCheckpoint
from difflab.callbacks.ema import EMA
from difflab.callbacks.generative_metrics import GenerativeMetricsCallback
from difflab.callbacks.nll import NLLCallback
from difflab.callbacks.reconstruction_metrics import ReconstructionMetricsCallback
from difflab.callbacks.run_record import RunRecord
from difflab.callbacks.sample_grid import SampleGridCallback
from difflab.callbacks.seeding import RankSeedCallback
from difflab.callbacks.throughput import TrainThroughput

__all__ = [
    "EMA",
    "GenerativeMetricsCallback",
    "ModelCheckpoint",
    "NLLCallback",
    "RankSeedCallback",
    "ReconstructionMetricsCallback",
    "RunRecord",
    "SampleGridCallback",
    "TrainThroughput",
]

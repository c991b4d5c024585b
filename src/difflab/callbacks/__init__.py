"""Lightning callbacks: EMA, checkpoints, run record, the training random stream, the non-finite guard, sample grids,
metrics, throughput."""

from difflab.callbacks.checkpoint import ModelCheckpoint
from difflab.callbacks.ema import EMA
from difflab.callbacks.generative_metrics import GenerativeMetricsCallback
from difflab.callbacks.loop_restore import CutEpochRestore
from difflab.callbacks.nll import NLLCallback
from difflab.callbacks.nonfinite import NonFiniteError, NonFiniteGuard
from difflab.callbacks.progress import ProgressLines
from difflab.callbacks.reconstruction_metrics import ReconstructionMetricsCallback
from difflab.callbacks.run_record import RunRecord
from difflab.callbacks.sample_grid import SampleGridCallback
from difflab.callbacks.seeding import TrainingRandomState
from difflab.callbacks.throughput import TrainThroughput
from difflab.callbacks.validation import FinalValidation, ObjectiveNotLogged

__all__ = [
    "EMA",
    "FinalValidation",
    "GenerativeMetricsCallback",
    "CutEpochRestore",
    "ModelCheckpoint",
    "NLLCallback",
    "NonFiniteError",
    "NonFiniteGuard",
    "ObjectiveNotLogged",
    "ProgressLines",
    "ReconstructionMetricsCallback",
    "RunRecord",
    "SampleGridCallback",
    "TrainThroughput",
    "TrainingRandomState",
]

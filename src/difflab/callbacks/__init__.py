"""Lightning callbacks: the run record in checkpoints and sample grids (EMA is Lightning's own)."""

from difflab.callbacks.run_record import RunRecord
from difflab.callbacks.sample_grid import SampleGridCallback

__all__ = ["RunRecord", "SampleGridCallback"]

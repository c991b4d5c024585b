"""A progress bar for sampling: steps × batches, with the network evaluations (NFE) and images per second.

tqdm (Lightning's own progress dependency) with ``disable=None``: silent when stderr is not a TTY (logs, CI, SLURM),
so batch jobs get no carriage-return noise.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm


class SamplingProgress:
    """``update(nfe)`` after each step of a chain, ``batch_done(n)`` after each batch of n images, ``close()``."""

    def __init__(self, num_batches: int, steps_per_batch: int, nfe_per_chain: int, enabled: bool = True) -> None:
        self.bar = tqdm(
            total=num_batches * steps_per_batch,
            desc="sampling",
            unit="step",
            disable=None if enabled else True,
            dynamic_ncols=True,
        )
        self.nfe_per_chain, self.nfe, self.images, self.start = nfe_per_chain, 0, 0, time.perf_counter()

    def update(self, nfe: int) -> None:
        self.nfe = nfe
        self.bar.set_postfix_str(self.postfix(), refresh=False)
        self.bar.update(1)

    def batch_done(self, num_images: int) -> None:
        self.images += num_images
        self.bar.set_postfix_str(self.postfix(), refresh=False)  # shown by the next update or by close()

    def postfix(self) -> str:
        return f"NFE {self.nfe}/{self.nfe_per_chain}, {self.rate():.1f} img/s"

    def rate(self) -> float:
        """Finished images per second since the start."""
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def close(self) -> None:
        self.bar.close()

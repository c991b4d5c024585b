"""Progress bars for long loops: sampling (steps × batches, with the network evaluations (NFE) and images per
second), real-image features, NLL, and the network evaluations of DDIM's encode-decode.

tqdm (Lightning's own progress dependency) on a terminal. When stderr is not a TTY (``make train > log``, SLURM, CI)
a bar is a :class:`LineProgress` instead: one plain log line every :data:`LINE_SECONDS` (done/total, rate, ETA),
so a batch job's log shows progress without carriage-return noise. ``enabled=False`` (the entry points'
``progress=false``) silences both.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger("difflab.progress")

LINE_SECONDS = 30.0  # a progress line at most this often when the output is not a terminal


def stderr_is_terminal() -> bool:
    return sys.stderr is not None and sys.stderr.isatty()


class LineProgress:
    """The part of tqdm's interface our loops use (``update``, ``set_postfix_str``, ``close``, ``n``), as log lines:
    ``desc: n/total unit (p %), rate, ETA, postfix`` at most every ``every`` seconds, and once at the end."""

    def __init__(self, total: int | None, desc: str, unit: str, every: float = LINE_SECONDS) -> None:
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.postfix, self.start = 0, "", time.perf_counter()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.every:
            self.report()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def report(self) -> None:
        self.last = time.perf_counter()
        log.info(progress_line(self.desc, self.n, self.total, self.unit, self.last - self.start, self.postfix))

    def close(self) -> None:
        if self.n:
            self.report()


def progress_line(desc: str, done: int, total: int | None, unit: str, seconds: float, extra: str = "") -> str:
    """``sampling: 120/250 step (48 %), 2.1 step/s, ETA 1 min 2 s, NFE 20/20``: one line of progress."""
    rate = done / max(seconds, 1e-9)
    text = f"{desc}: {done}" + (f"/{total} {unit} ({100 * done / total:.0f} %)" if total else f" {unit}")
    text += f", {rate:.3g} {unit}/s"
    if total and rate > 0 and done < total:
        left = round((total - done) / rate)
        text += f", ETA {left // 60} min {left % 60} s" if left >= 60 else f", ETA {left} s"
    return text + (f", {extra}" if extra else "")


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True) -> tqdm | LineProgress:
    """A bar with ETA: tqdm on a terminal, :class:`LineProgress` lines otherwise; nothing when ``enabled`` is
    false."""
    if enabled and not stderr_is_terminal():
        return LineProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, dynamic_ncols=True)


def progress_iter(items: Iterable[T], total: int | None, desc: str, unit: str, enabled: bool = True) -> Iterator[T]:
    """``items`` with a bar, opened at the first item (a loop that ends before it, e.g. statistics read from a
    cache, shows no empty bar) and closed when the loop ends or stops early."""
    bar = None
    try:
        for item in items:
            bar = bar or progress_bar(total, desc, unit, enabled)
            yield item
            bar.update(1)
    finally:
        if bar is not None:
            bar.close()


@contextlib.contextmanager
def count_forwards(net: torch.nn.Module, total: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """A bar over ``total`` forward passes of ``net`` (a forward hook): for loops that run the network inside
    library code without a step callback (DDIM's encode, then its decode)."""
    bar = progress_bar(total, desc, "NFE", enabled)
    handle = net.register_forward_hook(lambda *_: bar.update(1))
    try:
        yield bar
    finally:
        handle.remove()
        bar.close()


class SamplingProgress:
    """``update(nfe)`` after each step of a chain, ``batch_done(n)`` after each batch of n images, ``close()``.

    One bar may span several ``sample()`` calls (eval.py draws its metric samples batch by batch): build it with
    :meth:`for_sampler` and pass it as ``sample(progress=bar)``."""

    @classmethod
    def for_sampler(
        cls, sampler: Any, num_batches: int, enabled: bool = True, desc: str = "sampling"
    ) -> SamplingProgress:
        """A bar over ``num_batches`` chains of ``sampler`` at its configured number of steps."""
        sampler.set_timesteps(None)
        return cls(num_batches, len(sampler.timesteps), sampler.num_evaluations(None), enabled, desc)

    def __init__(
        self, num_batches: int, steps_per_batch: int, nfe_per_chain: int, enabled: bool = True, desc: str = "sampling"
    ) -> None:
        self.bar = progress_bar(num_batches * steps_per_batch, desc, "step", enabled)
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

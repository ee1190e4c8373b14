"""Progress of a run: a tqdm bar over steps and the throughput in examples per second."""

from __future__ import annotations

import time

import jax
from tqdm import tqdm  # the text bar: in a notebook without ipywidgets tqdm.auto would warn

__all__ = ["Throughput", "progress_bar"]


class Throughput:
    """Examples per second between marks; `mark(report=False)` starts a window without
    reporting (after the first step, whose window holds the compilation, an evaluation or a
    checkpoint). `rates` holds every rate reported."""

    def __init__(self) -> None:
        self._start: float | None = None
        self._images = 0
        self.rates: list[float] = []

    @property
    def started(self) -> bool:
        return self._start is not None

    def add(self, images: int) -> None:
        self._images += images

    def mark(self, report: bool = True) -> float | None:
        now, rate = time.perf_counter(), None
        if report and self._start is not None and self._images:
            rate = self._images / (now - self._start)
            self.rates.append(rate)
        self._start, self._images = now, 0
        return rate


def progress_bar(total: int, initial: int = 0, enabled: bool = True,
                 description: str = "train") -> tqdm:
    """A tqdm bar over steps (on stderr; only on process 0). Set its postfix with
    `bar.set_postfix(loss=..., img_s=...)` and advance it with `bar.update(n)`."""
    return tqdm(total=total, initial=initial, desc=description, unit="step",
                disable=not enabled or jax.process_index() != 0, dynamic_ncols=True,
                leave=False)

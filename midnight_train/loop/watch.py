"""Watching the loader: a warning when waiting for batches takes more than a share of the step
time over a window of steps (warned with a doubling window, so rarer and rarer)."""

from __future__ import annotations

from collections.abc import Callable

STARVED_FRACTION = 0.10
STARVED_WINDOW = 20


class LoaderWatch:
    """Says when waiting for batches takes more than ``fraction`` of the step time, over windows
    of ``window`` steps that double after each warning. The first step of a run is left out
    (it waits for the loader's workers to start)."""

    def __init__(self, fraction: float, window: int):
        self.fraction, self.window = fraction, window
        self.started = False
        self._reset()

    def _reset(self) -> None:
        self.waited = self.took = 0.0
        self.first: int | None = None
        self.count = 0

    def add(self, step: int, waited: float, took: float,
            warn: Callable[[float, int, int], None]) -> None:
        if not self.started:
            self.started = True
            return
        self.waited, self.took, self.count = self.waited + waited, self.took + took, self.count + 1
        self.first = self.first or step
        if self.count < self.window:
            return
        share = self.waited / max(self.took, 1e-9)
        if share > self.fraction:
            warn(share, self.first, step)
            self.window *= 2
        self._reset()


def starving_message(fraction: float, first: int, last: int, workers: int | None) -> str:
    now = f", now {workers}" if workers is not None else ""
    return (f"the data loader is starving training: {fraction:.0%} of the time of steps "
            f"{first}-{last} went to waiting for batches (data_wait_s in metrics.jsonl). "
            f"Give it more loader workers (data.num_workers{now}) and CPU cores, or "
            f"faster storage")

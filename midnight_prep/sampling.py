"""Seeded, uniform random tile positions restricted to where a tile can pass the foreground test."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator

import numpy as np

from .tissue import ForegroundMap


def slide_rng(seed: int, slide_id: str, mpp: float, purpose: str = "positions") -> np.random.Generator:
    """RNG of one (slide, magnification): depends only on these values, never on worker count,
    job grouping or scheduling order."""
    digest = hashlib.sha256(f"{purpose}|{slide_id}|{round(mpp * 1000)}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


class TissueSampler:
    """Uniform random tile positions over the part of a slide where a tile can pass the
    foreground test: the set-up (which mask cells can hold a passing corner) done once, so one
    (slide, tile extent) can be sampled many times with different generators.

    Rejection sampling with a cheap proposal: a mask cell is a candidate when *some* box with its
    top-left in that cell could reach the threshold (an upper bound from the integral image), a
    cell is drawn uniformly among candidates, the corner is jittered uniformly inside it (so
    positions are not snapped to the mask grid), then the exact fraction is checked.
    """

    def __init__(self, fg: ForegroundMap, width: int, height: int, extent: float, threshold: float):
        self.fg, self.width, self.height = fg, width, height
        self.extent, self.threshold = extent, threshold
        self.cells_i = self.cells_j = np.zeros(0, np.int32)
        if extent > width or extent > height:
            return
        k = extent / fg.cell  # box side in mask cells
        h, w = fg.shape
        nu = min(w, int((width - extent) / fg.cell) + 1)  # cells holding a valid top-left corner
        nv = min(h, int((height - extent) / fg.cell) + 1)
        upper = fg.box_sums(math.ceil(k) + 1)[:nv, :nu] / (k * k)
        cells_j, cells_i = np.nonzero(upper >= threshold)
        # int32 halves the memory of a slide kept for online sampling; the arithmetic below
        # promotes to float64 either way, so positions are the same.
        self.cells_i, self.cells_j = cells_i.astype(np.int32), cells_j.astype(np.int32)

    @property
    def empty(self) -> bool:
        """No position can pass."""
        return self.cells_i.size == 0

    @property
    def nbytes(self) -> int:
        return self.cells_i.nbytes + self.cells_j.nbytes

    def positions(self, rng: np.random.Generator, rejected: dict | None = None, batch: int = 256,
                  give_up_after: int = 64) -> Iterator[tuple[int, int, float]]:
        """Endless stream of (x, y, foreground fraction): level-0 top-left corners of
        ``extent``-sided boxes inside the slide, uniformly distributed over all positions whose
        foreground fraction is at least ``threshold``. Ends at once when no position can pass,
        or when ``give_up_after`` batches in a row found none (the upper bound can be loose).
        ``rejected["foreground"]`` counts proposals that failed the check."""
        if self.empty:
            return
        fg, width, height, extent = self.fg, self.width, self.height, self.extent
        cells_i, cells_j = self.cells_i, self.cells_j
        barren = 0
        while barren < give_up_after:
            pick = rng.integers(0, cells_i.size, batch)
            jitter = rng.random((2, batch))
            x = np.floor((cells_i[pick] + jitter[0]) * fg.cell).astype(np.int64)
            y = np.floor((cells_j[pick] + jitter[1]) * fg.cell).astype(np.int64)
            inside = (x <= width - extent) & (y <= height - extent)
            frac = fg.fraction(x, y, extent)
            ok = inside & (frac >= self.threshold)
            barren = 0 if ok.any() else barren + 1
            for n in range(batch):  # in order, so counts stop exactly where the consumer stops
                if ok[n]:
                    yield int(x[n]), int(y[n]), float(frac[n])
                elif rejected is not None:
                    rejected["foreground"] = rejected.get("foreground", 0) + 1


def candidate_positions(
    fg: ForegroundMap,
    width: int,
    height: int,
    extent: float,
    threshold: float,
    rng: np.random.Generator,
    rejected: dict | None = None,
    batch: int = 256,
    give_up_after: int = 64,
) -> Iterator[tuple[int, int, float]]:
    """Endless stream of uniform positions whose foreground fraction is at least ``threshold``
    (see `TissueSampler`, set up afresh for this one stream)."""
    yield from TissueSampler(fg, width, height, extent, threshold).positions(
        rng, rejected, batch, give_up_after)

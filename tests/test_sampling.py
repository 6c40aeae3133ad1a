import itertools

import numpy as np
from scipy.stats import chisquare

from midnight_prep.sampling import candidate_positions, slide_rng
from midnight_prep.tissue import ForegroundMap


def _blob_mask() -> np.ndarray:
    yy, xx = np.mgrid[0:24, 0:30]
    mask = ((yy - 10) ** 2 + (xx - 12) ** 2 < 60) | ((xx > 22) & (yy > 14))
    return mask


def test_positions_are_uniform_over_the_passing_set():
    cell, width, height, extent, thr = 8.0, 240, 192, 40.0, 0.4
    fg = ForegroundMap.from_mask(_blob_mask(), cell)
    # Brute force: every integer top-left corner inside the slide, and which ones pass.
    ys, xs = np.mgrid[0:height - int(extent) + 1, 0:width - int(extent) + 1]
    passing = fg.fraction(xs.ravel(), ys.ravel(), extent) >= thr
    px, py = xs.ravel()[passing], ys.ravel()[passing]
    assert 0 < passing.mean() < 0.6

    rejected = {}
    n = 40000
    got = np.array(list(itertools.islice(
        candidate_positions(fg, width, height, extent, thr, slide_rng(0, "s", 1.0), rejected), n)))
    assert got.shape == (n, 3)
    assert (got[:, 2] >= thr).all()
    assert (fg.fraction(got[:, 0], got[:, 1], extent) >= thr).all()
    # Histograms over coarse blocks match the exact passing area of each block.
    bins = (np.arange(0, width + 1, 25), np.arange(0, height + 1, 25))
    expected, _, _ = np.histogram2d(px, py, bins=bins)
    observed, _, _ = np.histogram2d(got[:, 0], got[:, 1], bins=bins)
    keep = expected > 0
    assert observed[~keep].sum() == 0
    exp = expected[keep] / expected[keep].sum() * n
    assert chisquare(observed[keep], exp).pvalue > 1e-3
    # Not snapped to the mask grid: corners fall on every offset within a cell.
    assert len(np.unique(got[:, 0] % cell)) == cell
    assert rejected["foreground"] > 0  # the cheap proposal over-covers; exact check rejects


def test_positions_are_deterministic_per_slide_and_mpp():
    fg = ForegroundMap.from_mask(_blob_mask(), 8.0)

    def draw(seed, sid, mpp):
        return list(itertools.islice(candidate_positions(fg, 240, 192, 40.0, 0.4, slide_rng(seed, sid, mpp)), 50))

    assert draw(0, "a", 1.0) == draw(0, "a", 1.0)
    assert draw(0, "a", 1.0) != draw(1, "a", 1.0)
    assert draw(0, "a", 1.0) != draw(0, "b", 1.0)
    assert draw(0, "a", 1.0) != draw(0, "a", 0.5)


def test_no_positions_when_nothing_can_pass():
    fg = ForegroundMap.from_mask(np.zeros((10, 10), bool), 8.0)
    assert list(candidate_positions(fg, 80, 80, 16.0, 0.4, slide_rng(0, "s", 1))) == []
    fg = ForegroundMap.from_mask(np.ones((10, 10), bool), 8.0)
    assert list(candidate_positions(fg, 80, 80, 100.0, 0.4, slide_rng(0, "s", 1))) == []  # tile > slide

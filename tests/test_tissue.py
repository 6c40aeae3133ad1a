import numpy as np
import pytest

from midnight_prep.tissue import ForegroundMap, tissue_mask


def brute_fraction(mask: np.ndarray, cell: float, x: float, y: float, extent: float, oversample: int = 64) -> float:
    """Foreground fraction by point sampling a fine grid inside the box (independent of the SAT)."""
    t = (np.arange(oversample) + 0.5) / oversample * extent
    u = ((x + t) / cell).astype(int)
    v = ((y + t) / cell).astype(int)
    u = np.clip(u, 0, mask.shape[1] - 1)
    v = np.clip(v, 0, mask.shape[0] - 1)
    return float(mask[np.ix_(v, u)].mean())


def test_fraction_is_exact_for_unaligned_boxes():
    rng = np.random.default_rng(1)
    mask = rng.random((40, 50)) < 0.4
    fg = ForegroundMap.from_mask(mask, cell=16.0)
    xs = rng.uniform(0, 600, 50)
    ys = rng.uniform(0, 400, 50)
    got = fg.fraction(xs, ys, 100.0)
    ref = [brute_fraction(mask, 16.0, x, y, 100.0, oversample=800) for x, y in zip(xs, ys)]
    np.testing.assert_allclose(got, ref, atol=0.01)


def test_fraction_aligned_box_equals_mask_mean():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 3:5] = True
    fg = ForegroundMap.from_mask(mask, cell=4.0)
    assert fg.fraction(12.0, 8.0, 8.0) == pytest.approx(mask[2:4, 3:5].mean())
    assert fg.fraction(0.0, 0.0, 40.0) == pytest.approx(mask.mean())
    # Half a cell to the left of the block: one of the two columns is half covered.
    assert fg.fraction(10.0, 8.0, 8.0) == pytest.approx(0.75)


def test_box_sums_match_loops():
    rng = np.random.default_rng(2)
    mask = rng.random((9, 7)) < 0.5
    fg = ForegroundMap.from_mask(mask, cell=1.0)
    sums = fg.box_sums(3)
    for j in range(9):
        for i in range(7):
            assert sums[j, i] == mask[j:j + 3, i:i + 3].sum()


def test_mask_of_glass_is_empty_and_of_tissue_is_not(cmu_slide):
    from midnight_prep.samples import background
    from midnight_prep.slides import Slide

    assert not tissue_mask(background(300, 200)).any()
    with Slide(str(cmu_slide)) as s:
        rgb = np.concatenate(list(s.thumbnail_strips(8.0)))
    mask = tissue_mask(rgb)
    assert 0.2 < mask.mean() < 0.95  # the CMU region is mostly tissue with some glass

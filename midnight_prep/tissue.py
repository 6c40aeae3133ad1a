"""Tissue mask of a slide and O(1) foreground fractions of any box through an integral image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

# Saturation (max - min of RGB, 0-255) below which a pixel is never tissue, whatever Otsu says:
# an all-background slide then has an empty mask instead of a mask of scanner noise.
MIN_SATURATION = 20
NEAR_WHITE = 225  # min(R, G, B) above this: glass
NEAR_BLACK = 30  # max(R, G, B) below this: pen, folds, scanner borders


# Median brightness (max of RGB, 0-255) of a thumbnail below which a slide is taken for
# fluorescence (dark background, stained structures glowing): brightfield glass is near white
# and even a slide covered in H&E has a median above 100, while between DAPI-stained nuclei it
# is dark. Such tiles can pass the HSV filter (DAPI is blue), so they are refused per slide.
DARK_MEDIAN = 64


def dark_background(rgb: np.ndarray) -> float | None:
    """The median brightness of a low-resolution RGB image when it is below DARK_MEDIAN (not a
    brightfield slide: fluorescence, or a dark-field scan), else None."""
    median = float(np.median(rgb.max(axis=-1)))
    return median if median < DARK_MEDIAN else None


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image: Otsu on saturation after a light blur,
    with near-white and near-black pixels removed."""
    c = rgb.astype(np.int16)
    sat = (c.max(axis=-1) - c.min(axis=-1)).astype(np.float32)
    sat = ndimage.gaussian_filter(sat, sigma=1.0)
    candidates = (c.min(axis=-1) < NEAR_WHITE) & (c.max(axis=-1) > NEAR_BLACK)
    # Otsu over all pixels, glass included: it should split glass from tissue, not tissue in two.
    threshold = MIN_SATURATION
    if sat.max() > sat.min():
        threshold = max(threshold, float(threshold_otsu(sat)))
    return candidates & (sat > threshold)


@dataclass
class ForegroundMap:
    """Integral image of a tissue mask whose pixels are ``cell`` level-0 pixels wide."""

    sat: np.ndarray  # (H + 1, W + 1) float64 summed-area table, sat[0, :] = sat[:, 0] = 0
    cell: float

    @classmethod
    def from_mask(cls, mask: np.ndarray, cell: float) -> ForegroundMap:
        sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
        sat[1:, 1:] = mask.astype(np.float64).cumsum(0).cumsum(1)
        return cls(sat, float(cell))

    @property
    def area(self) -> float:
        """Tissue area in level-0 pixels²."""
        return float(self.sat[-1, -1]) * self.cell * self.cell

    @property
    def shape(self) -> tuple[int, int]:
        return self.sat.shape[0] - 1, self.sat.shape[1] - 1

    def _area_to(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Mask area in [0, u) x [0, v) (mask units, fractional). Bilinear interpolation of the
        summed-area table is exact for a piecewise-constant mask, so boxes need not align."""
        h, w = self.shape
        u = np.clip(u, 0, w)
        v = np.clip(v, 0, h)
        i = np.minimum(np.floor(u).astype(np.int64), w - 1)
        j = np.minimum(np.floor(v).astype(np.int64), h - 1)
        a, b = u - i, v - j
        s = self.sat
        return (s[j, i] * (1 - a) * (1 - b) + s[j, i + 1] * a * (1 - b)
                + s[j + 1, i] * (1 - a) * b + s[j + 1, i + 1] * a * b)

    def fraction(self, x, y, extent: float) -> np.ndarray:
        """Foreground fraction of square boxes with level-0 top-left (x, y) and side ``extent``."""
        u0 = np.asarray(x, np.float64) / self.cell
        v0 = np.asarray(y, np.float64) / self.cell
        k = extent / self.cell
        area = (self._area_to(u0 + k, v0 + k) - self._area_to(u0, v0 + k)
                - self._area_to(u0 + k, v0) + self._area_to(u0, v0))
        return area / (k * k)

    def box_sums(self, size: int) -> np.ndarray:
        """Mask area of every ``size`` x ``size`` integer box with top-left at each cell, clipped at
        the edges: shape (H, W)."""
        h, w = self.shape
        j = np.arange(h)
        i = np.arange(w)
        j1, i1 = np.minimum(j + size, h), np.minimum(i + size, w)
        s = self.sat
        return s[j1][:, i1] - s[j][:, i1] - s[j1][:, i] + s[j][:, i]

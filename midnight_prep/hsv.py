"""HSV colour filter (Virchow2 / Midnight), in OpenCV's 8-bit HSV convention.

OpenCV 8-bit: H = hue in degrees / 2 in [0, 180), S = 255 * (V - min) / V (0 where V = 0),
V = max(R, G, B). PIL (hue 0-255) and scikit-image (0-1) use other scales, where the same
thresholds select the wrong colours; this vectorised numpy version needs no OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HsvBounds:
    """Inclusive per-channel bounds a pixel must fall in to count as stained tissue."""

    h: tuple[float, float] = (90, 180)
    s: tuple[float, float] = (8, 255)
    v: tuple[float, float] = (103, 255)


DEFAULT_BOUNDS = HsvBounds()


def rgb_to_hsv_opencv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32 HSV [..., 3] on OpenCV's 8-bit scales (unrounded)."""
    c = rgb.astype(np.float32)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    v = c.max(axis=-1)
    delta = v - c.min(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(v > 0, 255.0 * delta / v, 0.0)
        safe = np.where(delta > 0, delta, 1.0)
        h = np.where(v == r, 60.0 * (g - b) / safe,
                     np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe))
    h = np.where(delta > 0, h, 0.0)
    h = np.where(h < 0, h + 360.0, h) / 2.0
    return np.stack([h, s, v], axis=-1)


def hsv_fraction(rgb: np.ndarray, bounds: HsvBounds = DEFAULT_BOUNDS) -> float:
    """Fraction of pixels of a uint8 RGB tile whose OpenCV-convention HSV lies in ``bounds``.

    H and S are rounded half-up to integers like ``cv2.cvtColor(..., COLOR_RGB2HSV)`` does
    (fixed-point), so the result matches OpenCV's on the bin edges that matter.
    """
    hsv = rgb_to_hsv_opencv(rgb)
    h = np.floor(hsv[..., 0] + 0.5)
    h = np.where(h >= 180, h - 180, h)
    s = np.floor(hsv[..., 1] + 0.5)
    v = hsv[..., 2]
    ok = ((h >= bounds.h[0]) & (h <= bounds.h[1]) & (s >= bounds.s[0]) & (s <= bounds.s[1])
          & (v >= bounds.v[0]) & (v <= bounds.v[1]))
    return float(ok.mean())

"""HSV colour filter (Virchow2 / Midnight), in OpenCV's 8-bit HSV convention.

OpenCV 8-bit: H = hue in degrees / 2, in [0, 180); S = 255 * (V - min) / V (0 where V = 0);
V = max(R, G, B). PIL (hue 0-255) and scikit-image (0-1) use other scales, where the same
thresholds select the wrong colours. We compute H and S in integers with the same 12-bit
fixed-point division tables OpenCV's `cvtColor(RGB2HSV)` uses, so results match it bit for bit
(tested over all 2^24 colours) without an OpenCV dependency.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

_SHIFT = 12
_HALF = 1 << (_SHIFT - 1)
_n = np.arange(256, dtype=np.float64)
with np.errstate(divide="ignore"):
    # round((255 << 12) / v) and round((180 << 12) / (6 d)), 0 for v = 0 / d = 0, as in OpenCV.
    _SDIV = np.where(_n > 0, np.floor((255 << _SHIFT) / _n + 0.5), 0).astype(np.int32)
    _HDIV = np.where(_n > 0, np.floor((180 << _SHIFT) / (6 * _n) + 0.5), 0).astype(np.int32)


@dataclass(frozen=True)
class HsvBounds:
    """Inclusive OpenCV-convention bounds a pixel must fall in to count as stained tissue."""

    h: tuple[int, int] = (90, 180)
    s: tuple[int, int] = (8, 255)
    v: tuple[int, int] = (103, 255)


DEFAULT_BOUNDS = HsvBounds()


def _hsv_planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    d = v - np.minimum(np.minimum(r, g), b)
    s = (d * _SDIV[v] + _HALF) >> _SHIFT
    red_max = v == r
    green_max = ~red_max & (v == g)
    h = np.where(red_max, g - b, np.where(green_max, b - r + 2 * d, r - g + 4 * d))
    h = (h * _HDIV[d] + _HALF) >> _SHIFT
    h[h < 0] += 180
    return h, s, v


def rgb_to_hsv_opencv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> uint8 HSV [..., 3], identical to OpenCV's 8-bit RGB2HSV."""
    return np.stack(_hsv_planes(rgb), axis=-1).astype(np.uint8)


def _in_bounds(rgb: np.ndarray, bounds: HsvBounds) -> np.ndarray:
    ok = np.ones(rgb.shape[:-1], bool)
    for plane, (lo, hi) in zip(_hsv_planes(rgb), (bounds.h, bounds.s, bounds.v)):
        if lo > 0:
            ok &= plane >= lo
        if hi < 255:
            ok &= plane <= hi
    return ok


@functools.lru_cache(maxsize=4)
def _lookup_table(bounds: HsvBounds) -> np.ndarray:
    """In-bounds flag of all 2^24 colours (16 MB): a tile then costs one gather instead of a
    dozen array passes. Building it takes ~1-2 s, so it is cached on disk (2 MB packed) and
    every later worker process loads it in milliseconds."""
    from .samples import cache_dir

    h, s, v = bounds.h, bounds.s, bounds.v
    # v1: bump when _in_bounds changes, so no stale table is ever loaded.
    name = f"hsv-lut-v1-{h[0]}-{h[1]}-{s[0]}-{s[1]}-{v[0]}-{v[1]}.npy"
    try:
        path = cache_dir() / name
        return np.unpackbits(np.load(path), count=1 << 24).astype(bool)
    except (OSError, ValueError):
        pass
    r, g, b = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8),
                          np.arange(256, dtype=np.uint8), indexing="ij")
    table = _in_bounds(np.stack([r, g, b], axis=-1), bounds).reshape(-1)
    try:  # write-then-rename: concurrent workers never read a half-written table
        path = cache_dir() / name
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, np.packbits(table))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the rebuild
    return table


def hsv_mask(rgb: np.ndarray, bounds: HsvBounds = DEFAULT_BOUNDS) -> np.ndarray:
    """Boolean mask of the pixels of a uint8 RGB image whose OpenCV HSV lies in ``bounds``."""
    index = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    return _lookup_table(bounds)[index]


def hsv_fraction(rgb: np.ndarray, bounds: HsvBounds = DEFAULT_BOUNDS) -> float:
    """Fraction of the pixels of a uint8 RGB tile in the OpenCV-convention HSV ``bounds``."""
    return float(hsv_mask(rgb, bounds).mean())

"""Open a whole-slide image, resolve its µm/px, and read regions at a target µm/px.

Reads go through a fast path where the slide is a tiled TIFF (SVS, generic pyramidal TIFF):
only the compressed source tiles a region touches are decoded (tifffile + imagecodecs), with a
cache of decoded tiles bounded per process (``TILE_CACHE``). Every other format, and any level the fast path cannot map, is
read with OpenSlide. Both paths return the same pixels (tested).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# µm/px outside this range is treated as missing (e.g. a 72-dpi default resolution tag).
PLAUSIBLE_MPP = (0.02, 50.0)
# A level may be this much coarser than the target and still be read (a tiny upsample).
DEFAULT_MPP_TOLERANCE = 0.05


class SlideError(Exception):
    """The slide cannot be used. The message says what is wrong and what to do about it."""


def _openslide():
    """OpenSlide, imported where a slide is opened: training from shards needs none of it."""
    try:
        import openslide
    except ImportError as e:
        raise SlideError(f"OpenSlide is not installed ({e}): pip install openslide-python "
                         f"openslide-bin") from e
    return openslide


@dataclass(frozen=True)
class Level:
    index: int
    width: int
    height: int
    downsample: float
    mpp: float


def _plausible(mpp: float | None) -> bool:
    return mpp is not None and math.isfinite(mpp) and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def resolve_mpp(properties: dict, override: float | None = None) -> tuple[float, str]:
    """(µm/px of level 0, where it came from): OpenSlide metadata, then the TIFF resolution
    tags, then the slide list's override. Raises SlideError when none is usable: we never
    guess a magnification."""
    try:
        mx = float(properties.get("openslide.mpp-x", "nan"))
        my = float(properties.get("openslide.mpp-y", "nan"))
    except ValueError:
        mx = my = float("nan")
    if _plausible(mx) and _plausible(my):
        return (mx + my) / 2, "openslide.mpp"
    unit = str(properties.get("tiff.ResolutionUnit", "")).lower()
    per_unit_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    try:
        xres = float(properties.get("tiff.XResolution", "nan"))
    except ValueError:
        xres = float("nan")
    if per_unit_um and xres > 0:
        mpp = per_unit_um / xres
        if _plausible(mpp):
            return mpp, "tiff.resolution"
    if override is not None and _plausible(float(override)):
        return float(override), "override"
    if override is not None:
        raise SlideError(
            f"no usable µm/px: the slide has none in its metadata and the slide list's mpp "
            f"{override!r} is not a valid one (give a number in [{PLAUSIBLE_MPP[0]:g}, "
            f"{PLAUSIBLE_MPP[1]:g}])")
    raise SlideError(
        "no usable µm/px: the slide has no openslide.mpp-x/y metadata and no plausible TIFF "
        "resolution; add an 'mpp' column for it to the slide list (CSV: path,mpp)"
    )


class TileCache:
    """The decoded source tiles of every slide open in this process, least recently used dropped
    first, bounded in bytes (not per slide: a process with many slides open, such as a training
    loader worker's pool, stays within one budget). Thread-safe; decoding runs outside the lock."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._tiles: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get_or(self, key: tuple, make) -> np.ndarray:
        with self._lock:
            tile = self._tiles.get(key)
            if tile is not None:
                self._tiles.move_to_end(key)
                return tile
        tile = make()
        with self._lock:
            if key not in self._tiles and tile.nbytes <= self.max_bytes:
                self._tiles[key] = tile
                self.bytes += tile.nbytes
                self._evict()
        return tile

    def resize(self, max_bytes: int) -> None:
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()

    def _evict(self) -> None:
        while self.bytes > self.max_bytes:
            self.bytes -= self._tiles.popitem(last=False)[1].nbytes

    def drop(self, owner: int) -> None:
        """Forget the tiles of one reader (``key[0] == owner``), when its slide closes."""
        with self._lock:
            for key in [k for k in self._tiles if k[0] == owner]:
                self.bytes -= self._tiles.pop(key).nbytes


# One per process: MIDNIGHT_TILE_CACHE_MB (default 128) or set_tile_cache_mb.
DEFAULT_TILE_CACHE_MB = 128
TILE_CACHE = TileCache(int(float(os.environ.get("MIDNIGHT_TILE_CACHE_MB", DEFAULT_TILE_CACHE_MB))
                           * 2**20))
_OPENSLIDE_CACHE: list = []  # the shared OpenSlide cache of the same budget, made on first use
_reader_ids = itertools.count()


def set_tile_cache_mb(mb: float) -> None:
    """This process's decoded-tile budget (the fast path's cache, and OpenSlide's own shared
    cache for slides that are opened from now on)."""
    TILE_CACHE.resize(int(mb * 2**20))
    _OPENSLIDE_CACHE.clear()


def _shared_openslide_cache(openslide):
    """One OpenSlide cache for every slide of the process (OpenSlide >= 4 and openslide-python
    >= 1.3); without it each slide has its own 32 MiB."""
    if not _OPENSLIDE_CACHE and hasattr(openslide, "OpenSlideCache"):
        try:
            _OPENSLIDE_CACHE.append(openslide.OpenSlideCache(max(TILE_CACHE.max_bytes, 1)))
        except openslide.OpenSlideError:  # an OpenSlide library older than 4.0
            _OPENSLIDE_CACHE.append(None)
    return _OPENSLIDE_CACHE[0] if _OPENSLIDE_CACHE else None


class TiffTileReader:
    """Decode only the TIFF tiles a region touches. Levels it cannot serve map to None."""

    def __init__(self, path: str, levels: list[Level], cache: TileCache | None = None):
        import tifffile

        self._tif = tifffile.TiffFile(path)
        self._fd = os.open(path, os.O_RDONLY)
        self._cache = TILE_CACHE if cache is None else cache
        self._id = next(_reader_ids)
        self.pages = []
        candidates = [p for p in self._tif.pages if p.is_tiled]
        for lv in levels:
            page = next(
                (p for p in candidates
                 if (p.imagewidth, p.imagelength) == (lv.width, lv.height)
                 and p.samplesperpixel in (3, 4) and p.planarconfig == 1 and p.bitspersample == 8
                 and p.imagedepth == 1 and p.compression in (1, 5, 7, 8, 32946, 33003, 33005, 34712)),
                None,
            )
            self.pages.append(page)

    def can_read(self, level: int) -> bool:
        return self.pages[level] is not None

    def _tile(self, level: int, index: int) -> np.ndarray:
        def decode():
            page = self.pages[level]
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            data = os.pread(self._fd, count, offset) if count else None
            tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            tile = np.asarray(tile).reshape(page.tilelength, page.tilewidth, -1)
            return tile[..., :3]

        return self._cache.get_or((self._id, level, index), decode)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 [h, w, 3] at level coordinates (x, y); the region must lie in the level."""
        page = self.pages[level]
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        out = np.empty((h, w, 3), np.uint8)
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                tile = self._tile(level, ty * across + tx)
                # Overlap of this tile with the region, in level coordinates.
                x0, x1 = max(x, tx * tw), min(x + w, (tx + 1) * tw)
                y0, y1 = max(y, ty * th), min(y + h, (ty + 1) * th)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty * th:y1 - ty * th,
                                                          x0 - tx * tw:x1 - tx * tw]
        return out

    def close(self) -> None:
        self._cache.drop(self._id)
        self._tif.close()
        os.close(self._fd)


def _rgba_to_rgb(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    rgb, alpha = arr[..., :3], arr[..., 3:4]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    # Transparent areas (outside scanned regions) become white background, not black.
    a = alpha.astype(np.float32) / 255.0
    return (rgb * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


# A read size within this relative distance of a whole multiple of the tile size is snapped to
# it: the field of view changes by at most 1 %, and the resample becomes a plain copy (20x
# slides at 0.5 µm/px: 256.5 -> 256) or an exact box reduction (0.499 µm/px at 2 µm/px: 1026 ->
# 1024) instead of a Lanczos resize that changes almost nothing at several times the cost.
READ_SNAP = 0.01


def read_size_for(tile_size: int, target_mpp: float, level_mpp: float) -> int:
    """Pixels to read on a level of ``level_mpp`` for a ``tile_size`` tile at ``target_mpp``."""
    exact = tile_size * target_mpp / level_mpp
    k = round(exact / tile_size)
    if k >= 1 and abs(k * tile_size - exact) <= READ_SNAP * exact:
        return k * tile_size
    return round(exact)


def downscale(rgb: np.ndarray, size: int) -> np.ndarray:
    """Antialiased square resize of a uint8 RGB region to ``size``: box filter for exact
    integer factors (what the pyramid's own levels use, and fast), Lanczos otherwise."""
    h, w = rgb.shape[:2]
    if (h, w) == (size, size):
        return rgb
    img = Image.fromarray(rgb)
    if h == w and h % size == 0:
        return np.asarray(img.reduce(h // size))
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))


class Slide:
    """One open whole-slide image. Use as a context manager, or call close()."""

    def __init__(self, path: str, mpp_override: float | None = None, fast: bool = True):
        self.path = str(path)
        if not Path(self.path).exists():
            raise SlideError(f"file not found: {self.path}")
        openslide = _openslide()
        self._read_errors = (openslide.OpenSlideError, OSError, ValueError, RuntimeError)
        try:
            self._osr = openslide.OpenSlide(self.path)
            shared = _shared_openslide_cache(openslide)
            if shared is not None:
                self._osr.set_cache(shared)
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise SlideError(f"not a slide format OpenSlide can read ({e}); check the file type") from e
        except openslide.OpenSlideError as e:
            raise SlideError(f"OpenSlide cannot open it, the file is probably corrupt or truncated: {e}") from e
        try:
            self.mpp, self.mpp_source = resolve_mpp(dict(self._osr.properties), mpp_override)
        except SlideError:
            self._osr.close()
            raise
        self.levels = [
            Level(i, int(w), int(h), float(ds), self.mpp * float(ds))
            for i, ((w, h), ds) in enumerate(zip(self._osr.level_dimensions, self._osr.level_downsamples))
        ]
        self.width, self.height = self.levels[0].width, self.levels[0].height
        self._fast = None
        if fast and self.path.lower().endswith((".svs", ".tif", ".tiff")):
            try:
                self._fast = TiffTileReader(self.path, self.levels)
            except Exception:  # not a TIFF tifffile understands: OpenSlide serves all reads
                self._fast = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._osr is not None:
            self._osr.close()
            self._osr = None

    def level_for(self, target_mpp: float, tolerance: float = DEFAULT_MPP_TOLERANCE) -> Level | None:
        """The coarsest level whose µm/px is at most ``target_mpp * (1 + tolerance)``: a read
        downscales, or upsamples by at most ``tolerance`` (5 % by default; a 0.26 µm/px scan
        still gives 0.25 µm/px tiles); None when even level 0 is coarser than that."""
        usable = [lv for lv in self.levels if lv.mpp <= target_mpp * (1 + tolerance)]
        return max(usable, key=lambda lv: lv.mpp) if usable else None

    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 [h, w, 3] of the region at level coordinates (x, y) of ``level``."""
        try:
            if self._fast is not None and self._fast.can_read(level):
                lv = self.levels[level]
                if 0 <= x and 0 <= y and x + w <= lv.width and y + h <= lv.height:
                    return self._fast.read(level, x, y, w, h)
            ds = self.levels[level].downsample
            img = self._osr.read_region((round(x * ds), round(y * ds)), level, (w, h))
            return _rgba_to_rgb(img)
        except self._read_errors as e:
            raise SlideError(f"cannot read level {level} at ({x}, {y}) size {w}x{h}: {e}; the file "
                             "is probably damaged or truncated: copy or export it again") from e

    def thumbnail_strips(self, mpp: float, rows_per_strip: int = 1024):
        """Yield RGB strips (top to bottom) of the whole slide downscaled to ``mpp`` (box filter),
        reading from the coarsest level finer than ``mpp`` a strip at a time so memory stays
        bounded even on single-level slides."""
        lv = max((lv for lv in self.levels if lv.mpp <= mpp), key=lambda lv: lv.mpp, default=self.levels[0])
        scale = mpp / lv.mpp  # level pixels per output pixel, >= 1
        out_w = max(1, int(self.width * self.mpp / mpp))
        out_h = max(1, int(self.height * self.mpp / mpp))
        step = max(1, int(rows_per_strip / scale))
        for r0 in range(0, out_h, step):
            r1 = min(out_h, r0 + step)
            y0, y1 = int(round(r0 * scale)), min(lv.height, int(round(r1 * scale)))
            region = self.read_level(lv.index, 0, y0, lv.width, max(1, y1 - y0))
            strip = Image.fromarray(region).resize((out_w, r1 - r0), Image.Resampling.BOX)
            yield np.asarray(strip)

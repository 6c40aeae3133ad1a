"""Synthetic whole-slide images written with tifffile that OpenSlide reads for real: generic
pyramidal TIFF and Aperio-style SVS, with real H&E colours taken from the CMU sample slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image


def cmu_tissue(cmu_path: Path, width: int, height: int, zoom: float = 2.0,
               offset: tuple[int, int] = (1100, 3000)) -> np.ndarray:
    """A ``height`` x ``width`` RGB canvas of real tissue: the CMU region scaled by ``zoom``
    (2 makes its 0.5 µm/px look like 0.25 µm/px), from ``offset`` (x, y; the default is its
    densest tissue), mirrored to fill the canvas."""
    with openslide.OpenSlide(str(cmu_path)) as osr:
        base = np.asarray(osr.read_region((0, 0), 0, osr.dimensions).convert("RGB"))
    img = Image.fromarray(base)
    img = img.resize((round(img.width * zoom), round(img.height * zoom)), Image.Resampling.BICUBIC)
    tile = np.asarray(img)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    tile = np.concatenate([tile, tile[:, ::-1]], axis=1)[offset[1]:, offset[0]:]
    reps_y, reps_x = -(-height // tile.shape[0]), -(-width // tile.shape[1])
    rows = [np.concatenate([tile if (i + j) % 2 == 0 else tile[:, ::-1] for i in range(reps_x)], axis=1)
            for j in range(reps_y)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:height, :width])


def write_pyramid(path: Path, level0: np.ndarray, mpp: float | None, downsamples=(1, 4, 16),
                  tile: int = 256, svs: bool = False, quality: int = 90) -> Path:
    """Write a tiled JPEG pyramid. ``svs``: Aperio-style (MPP in the ImageDescription); otherwise
    generic TIFF with the µm/px in the resolution tags (``mpp=None`` writes no usable
    resolution)."""
    path = Path(path)
    img = Image.fromarray(level0)
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for i, ds in enumerate(downsamples):
            level = level0 if ds == 1 else np.asarray(
                img.resize((level0.shape[1] // ds, level0.shape[0] // ds), Image.Resampling.BOX))
            kwargs = dict(tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                          photometric="rgb", subfiletype=0 if i == 0 else 1, metadata=None)
            if svs:
                desc = (f"Aperio Image Library v12.0.0\r\n{level0.shape[1]}x{level0.shape[0]} "
                        f"({tile}x{tile}) JPEG/RGB Q={quality}|AppMag = {round(10 / mpp)}|MPP = {mpp}")
                kwargs["description"] = desc if i == 0 else f"Aperio Image Library v12.0.0\r\n{level.shape[1]}x{level.shape[0]}"
            elif mpp is not None:
                kwargs.update(resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER")
            else:
                kwargs.update(resolution=(1.0, 1.0), resolutionunit="NONE")
            tw.write(level, **kwargs)
    return path


def background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Empty glass: near-white with a little scanner noise."""
    rng = np.random.default_rng(seed)
    return np.clip(240 + rng.normal(0, 3, (height, width, 3)), 0, 255).astype(np.uint8)

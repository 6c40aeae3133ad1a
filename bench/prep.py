"""Shard-builder throughput, side by side in one run (one core, one process):

  ours   - midnight_prep's per-slide pipeline (mask -> sample -> read -> downscale -> HSV -> JPEG)
  naive  - a peer-style tiler: uniform random positions with no mask, each candidate read at
           level 0 with OpenSlide, PIL Lanczos resize, HSV via PIL's own HSV conversion
  floor  - the codec floor: for the tiles ours accepted, decode just the compressed source tiles
           each one touches (no cache) and encode the output JPEG; nothing else

Reported as accepted tiles/s per core (medians over repeats), with ratios, and the core-hours
tcga-100M (100 M tiles) would take at our rate. Usage: python bench/prep.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from midnight_prep.hsv import hsv_fraction
from midnight_prep.job import encode_jpeg, process_slide
from midnight_prep.plan import BuildParams, SlideSpec, mpp_key
from midnight_prep.samples import cache_dir, cmu_small_region, cmu_tissue, write_pyramid
from midnight_prep.slides import Slide, TiffTileReader, resolve_mpp

MPPS = (2.0, 1.0, 0.5, 0.25)
TILE = 256


def big_pyramid() -> Path:
    """A TCGA-like 40x pyramid (0.25 µm/px; levels 1, 4, 16; 256 px JPEG tiles) of real tissue."""
    path = cache_dir() / "bench-40x-16k.tiff"
    if not path.exists():
        tissue = cmu_tissue(cmu_small_region(), 16384, 12288)
        write_pyramid(path.with_suffix(".partial.tiff"), tissue, mpp=0.25).replace(path)
    return path


def run_ours(path: Path, quota: int, seed: int) -> tuple[float, list[dict]]:
    params = BuildParams(seed=seed)
    spec = SlideSpec(str(path), f"bench{seed}", quotas={mpp_key(m): quota for m in MPPS})
    metas = []
    started = time.process_time()
    report = process_slide(spec, params, lambda key, jpeg, meta: metas.append(meta))
    elapsed = time.process_time() - started
    assert report.status == "ok", report.error
    return len(metas) / elapsed, metas


def run_naive(path: Path, quota: int, seed: int, budget_s: float) -> float:
    """Peer-style: no mask, level-0 OpenSlide reads, PIL resize and PIL HSV."""
    rng = np.random.default_rng(seed)
    osr = openslide.OpenSlide(str(path))
    mpp0, _ = resolve_mpp(dict(osr.properties))
    w, h = osr.dimensions
    accepted = 0
    started = time.process_time()
    for mpp in MPPS:
        if mpp < mpp0 * 0.95:
            continue
        size = round(TILE * mpp / mpp0)
        got = 0
        t_mpp = time.process_time()
        while got < quota and time.process_time() - t_mpp < budget_s / len(MPPS):
            x, y = int(rng.integers(0, w - size)), int(rng.integers(0, h - size))
            img = osr.read_region((x, y), 0, (size, size)).convert("RGB").resize((TILE, TILE), Image.Resampling.LANCZOS)
            hsv = np.asarray(img.convert("HSV")).astype(np.int32)
            # PIL's hue is 0-255: rescale the OpenCV-convention bounds (H 90-180 of 180).
            ok = ((hsv[..., 0] >= 90 * 255 / 180) & (hsv[..., 1] >= 8) & (hsv[..., 2] >= 103)).mean()
            if ok >= 0.6:
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                got += 1
        accepted += got
    return accepted / (time.process_time() - started)


def run_floor(path: Path, metas: list[dict]) -> float:
    with Slide(str(path)) as slide:
        reader = TiffTileReader(str(path), slide.levels, cache_tiles=0)
        started = time.process_time()
        for m in metas:
            ds = slide.levels[m["level"]].downsample
            region = reader.read(m["level"], round(m["x"] / ds), round(m["y"] / ds), m["read_size"], m["read_size"])
            encode_jpeg(np.ascontiguousarray(region[:TILE, :TILE]), 90)
        elapsed = time.process_time() - started
        reader.close()
    return len(metas) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tiles and repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quota", type=int, default=200,
                    help="tiles per µm/px per run; 120 matches tcga-100M's density (2 k per µm/px on ~125 mm² of tissue)")
    args = ap.parse_args()
    repeats, quota = (1, 50) if args.quick else (args.repeats, args.quota)
    hsv_fraction(np.zeros((1, 1, 3), np.uint8))  # build/load the lookup table outside timing
    slides = {"CMU-1-Small-Region (real, 20x, 1 level)": cmu_small_region(),
              "synthetic 40x 16k x 12k (levels 1/4/16)": big_pyramid()}
    rows = []
    for name, path in slides.items():
        ours, naive, floor = [], [], []
        for r in range(repeats):  # interleaved so machine noise hits all three alike
            rate, metas = run_ours(path, quota, seed=r)
            ours.append(rate)
            floor.append(run_floor(path, metas))
            naive.append(run_naive(path, quota, seed=r, budget_s=20 if not args.quick else 6))
        rows.append((name, statistics.median(ours), statistics.median(naive), statistics.median(floor)))
    print("| slide | ours tiles/s/core | naive | codec floor | ours/naive | ours/floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, o, n, f in rows:
        print(f"| {name} | {o:.0f} | {n:.1f} | {f:.0f} | {o / n:.1f}x | {o / f:.0%} |")
    rate = rows[-1][1]
    print(f"\ntcga-100M at {rate:.0f} tiles/s per core (40x pyramid): "
          f"{1e8 / rate / 3600:,.0f} core-hours")


if __name__ == "__main__":
    main()

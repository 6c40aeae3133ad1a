"""Shard-builder throughput, side by side in one run (one core, one process):

  ours   - midnight_prep's per-slide pipeline (mask -> sample -> read -> downscale -> HSV -> JPEG)
  naive  - a peer-style tiler: uniform random positions with no mask, each candidate read at
           level 0 with OpenSlide, PIL Lanczos resize, HSV via PIL's own HSV conversion
  floor  - the codec floor: for the tiles ours accepted, decode just the compressed source tiles
           each one touches (no cache) and encode the output JPEG; nothing else

Reported as accepted tiles/s per core (medians over repeats), with ratios, and the core-hours
tcga-100M (100 M tiles) would take at our rate. Usage: python bench/prep.py [--quick]

With --output URL (s3://bucket/prefix, or --start-object-store for a throw-away local SeaweedFS):
whole builds (plan -> jobs in a process pool -> shards and manifests uploaded) of four 40x slides,
to that URL and to a local folder with the same workers, interleaved; tiles/s (wall clock) as
medians over repeats and the ratio object storage / local disk.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from midnight_prep.hsv import hsv_fraction
from midnight_prep.job import encode_jpeg, process_slide
from midnight_prep.plan import BuildParams, SlideSpec, mpp_key
from midnight_prep.samples import cache_dir, cmu_small_region, cmu_tissue, write_pyramid
from midnight_prep.slides import Slide, TiffTileReader, TileCache, resolve_mpp

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
        reader = TiffTileReader(str(path), slide.levels, cache=TileCache(0))
        started = time.process_time()
        for m in metas:
            ds = slide.levels[m["level"]].downsample
            region = reader.read(m["level"], round(m["x"] / ds), round(m["y"] / ds), m["read_size"], m["read_size"])
            encode_jpeg(np.ascontiguousarray(region[:TILE, :TILE]), 90)
        elapsed = time.process_time() - started
        reader.close()
    return len(metas) / elapsed


def _build(slides: list[str], output: str, tiles: int, workers: int) -> tuple[int, float]:
    """(tiles written, wall seconds) of a whole build of ``slides`` (one job each) to ``output``."""
    from midnight_prep.executors import run_jobs
    from midnight_prep.plan import make_plan

    plan = make_plan(slides, output, BuildParams(shard_size=200), tiles_per_slide=tiles, slides_per_job=1)
    started = time.perf_counter()
    outcomes = run_jobs(plan.jobs, plan.params, plan.output, plan.sha256(), workers)
    elapsed = time.perf_counter() - started
    errors = [o.error for o in outcomes.values() if o.error is not None]
    assert not errors, errors[0]
    return sum(o.manifest["samples"] for o in outcomes.values()), elapsed


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _versions(output: str) -> str:
    import botocore
    import fsspec
    import s3fs

    from midnight_prep.versions import describe

    extra = [f"fsspec {fsspec.__version__}, s3fs {s3fs.__version__}, botocore {botocore.__version__}"]
    try:
        extra.append(subprocess.run(["weed", "version"], capture_output=True, text=True,
                                    env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
                                    ).stdout.strip().replace("version ", "SeaweedFS ", 1))
    except OSError:
        pass
    return describe("midnight-prep", tuple(extra)) + f"\noutput {output} (endpoint {os.environ.get('AWS_ENDPOINT_URL', 'AWS default')})"


def output_bench(args) -> None:
    """Object storage vs local disk, whole builds, same workers, interleaved."""
    import fsspec

    store = None
    if args.start_object_store:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from object_store import BUCKET, ObjectStore

        store = ObjectStore(tempfile.mkdtemp(prefix="bench-object-store-"))
        store.start()
        os.environ.update(store.env())
        args.output = args.output or f"s3://{BUCKET}/bench-prep"
    try:
        big = big_pyramid()
        with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp:
            slides = []
            for i in range(4):  # one pyramid under four names: four slides, four jobs
                link = Path(tmp, f"slide{i}.tiff")
                link.symlink_to(big)
                slides.append(str(link))
            _build(slides[:1], f"{tmp}/warm", 8, 1)  # imports and caches outside the timing
            rates: dict[str, list[float]] = {"local disk": [], "object storage": []}
            count, server_cpus = 0, []
            for r in range(args.repeats):
                kinds = ["local disk", "object storage"] if r % 2 == 0 else ["object storage", "local disk"]
                for kind in kinds:
                    out = (f"{tmp}/out-{r}" if kind == "local disk"
                           else f"{args.output.rstrip('/')}/{uuid.uuid4().hex[:8]}")
                    server_cpu = _cpu_seconds(store.proc.pid) if store else 0.0
                    count, seconds = _build(slides, out, args.tiles_per_slide, args.workers)
                    rates[kind].append(count / seconds)
                    if store and kind == "object storage":
                        server_cpus.append(_cpu_seconds(store.proc.pid) - server_cpu)
                    fs, path = fsspec.core.url_to_fs(out)
                    fs.rm(path, recursive=True)
        print(_versions(args.output))
        print(f"\n{len(slides)} slides (synthetic 40x 16k x 12k), {count} tiles per build, "
              f"shards of 200, {args.workers} workers, {args.repeats} repeats (interleaved)\n")
        print("| output | tiles/s (median) | runs | vs local disk |")
        print("|---|---:|---|---:|")
        local = statistics.median(rates["local disk"])
        for kind, values in rates.items():
            median = statistics.median(values)
            print(f"| {kind} | {median:.0f} | {', '.join(f'{v:.0f}' for v in values)} | {median / local:.0%} |")
        # Each repeat ran both back to back: their ratio cancels most of the machine's drift.
        paired = [o / d for o, d in zip(rates["object storage"], rates["local disk"], strict=True)]
        print(f"\nobject storage / local disk, per repeat: {', '.join(f'{r:.0%}' for r in paired)}; "
              f"median {statistics.median(paired):.0%}")
        if server_cpus:
            print(f"the object store (on this machine's cores, like the workers) used "
                  f"{statistics.median(server_cpus):.2f} CPU-s per build; the build's wall time is "
                  f"{count / statistics.median(rates['object storage']):.2f} s")
    finally:
        if store is not None:
            store.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tiles and repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quota", type=int, default=200,
                    help="tiles per µm/px per run; 120 matches tcga-100M's density (2 k per µm/px on ~125 mm² of tissue)")
    ap.add_argument("--output", help="object storage URL: compare whole builds there and on local disk")
    ap.add_argument("--start-object-store", action="store_true",
                    help="with --output (default s3://midnight/bench-prep): a throw-away local SeaweedFS")
    ap.add_argument("--workers", type=int, default=2, help="with --output: pool workers")
    ap.add_argument("--tiles-per-slide", type=int, default=800, help="with --output")
    args = ap.parse_args()
    if args.output or args.start_object_store:
        output_bench(args)
        return
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

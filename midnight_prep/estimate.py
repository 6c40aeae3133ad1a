"""The cost of a plan before running it, without reading a pixel: tiles, shards (count and
bytes), core-hours, wall time on N nodes x C cores, slide bytes read (egress) and shard bytes
stored. Every rate and size below was measured on our own builds; BENCHMARKS.md ("Shard
builder" and "Cost model figures") has the commands that produced them."""

from __future__ import annotations

import csv
import heapq
import math
import os
import posixpath

import fsspec

from .plan import Plan
from .progress import duration, size
from .shards import is_local, local_path

# Accepted tiles per second on one core at 256 px, 4-magnification mix (2/1/0.5/0.25 µm/px) on
# the TCGA-like synthetic 40x pyramid: the slowest (`bench/prep.py --quota 120`, loaded machine)
# and the fastest (`bench/prep.py`) run in BENCHMARKS.md "Shard builder". A whole build (shuffle
# and shard writing included) ran at 461 tiles/s per CPU-second (BENCHMARKS.md "Cost model
# figures"), so the range is not optimistic for slides on local disk.
TILES_PER_CORE_S = (251.0, 423.0)
RATE_TILE_SIZE = 256  # other tile sizes: the rate scales with 1 / pixels (512 px measured 4.0x slower)

# Mean bytes of one sample in a shard (JPEG q90 + JSON + tar headers) by tile size and µm/px,
# from `midnight-prep build` on the synthetic 40x pyramid and the real CMU slide (BENCHMARKS.md
# "Cost model figures"). Other (size, µm/px): the nearest measured one, scaled by pixel count.
BYTES_PER_TILE = {
    256: {2.0: 38334, 1.0: 37993, 0.5: 32701, 0.25: 23254},
    512: {0.5: 115586, 0.25: 84229},
}

DEFAULT_NODES = 1
DEFAULT_CORES_PER_NODE = 32


def bytes_per_tile(tile_size: int, mpp: float) -> float:
    size = min(BYTES_PER_TILE, key=lambda s: abs(math.log(tile_size / s)))
    near = min(BYTES_PER_TILE[size], key=lambda m: abs(math.log(mpp / m)))
    return BYTES_PER_TILE[size][near] * (tile_size / size) ** 2


def tiles_per_core_s(tile_size: int) -> tuple[float, float]:
    """(slowest, fastest) measured rate, scaled to ``tile_size``."""
    scale = (RATE_TILE_SIZE / tile_size) ** 2
    return TILES_PER_CORE_S[0] * scale, TILES_PER_CORE_S[1] * scale


def read_sizes_file(path: str) -> dict[str, int]:
    """File name -> bytes from a GDC manifest (tab-separated: id, filename, md5, size) or any
    CSV with a ``size`` column and a ``filename`` or ``path`` column."""
    with open(path, newline="") as f:
        head = f.readline()
        f.seek(0)
        rows = csv.DictReader(f, delimiter="\t" if "\t" in head else ",")
        fields = set(rows.fieldnames or [])
        name = "filename" if "filename" in fields else "path" if "path" in fields else None
        if "size" not in fields or name is None:
            raise ValueError(f"{path}: needs a 'size' column and a 'filename' or 'path' column "
                             f"(got {sorted(fields)})")
        return {posixpath.basename(r[name].strip()): int(r["size"]) for r in rows if r.get("size")}


def slide_sizes(paths: list[str], sizes_file: str | None = None) -> dict[str, int | None]:
    """path -> file size in bytes (None when unknown): from ``sizes_file`` by file name, else
    the local file, else one listing per bucket of the remote ones (no per-slide requests)."""
    if sizes_file:
        named = read_sizes_file(sizes_file)
        return {p: named.get(posixpath.basename(p)) for p in paths}
    sizes: dict[str, int | None] = {}
    remote: dict[str, list[str]] = {}
    for p in paths:
        if is_local(p):
            try:
                sizes[p] = os.path.getsize(local_path(p))
            except OSError:
                sizes[p] = None
        else:
            protocol, rest = p.split("://", 1)
            remote.setdefault(f"{protocol}://{rest.split('/', 1)[0]}", []).append(p)
    for urls in remote.values():
        fs, _ = fsspec.core.url_to_fs(urls[0])
        stripped = [fs._strip_protocol(u) for u in urls]
        prefix = posixpath.commonpath(stripped) if len(stripped) > 1 else posixpath.dirname(stripped[0])
        try:
            listed = {fs._strip_protocol(k): int(v["size"]) for k, v in fs.find(prefix, detail=True).items()}
        except (OSError, ValueError):
            listed = {}
        sizes.update({u: listed.get(s) for u, s in zip(urls, stripped)})
    return sizes


def slide_limits(plan: Plan) -> dict[str, dict[str, int]]:
    """path -> µm/px -> the most tiles that slide can give there, from its header (no pixel
    read; local slides that open): 0 where it cannot give that µm/px (the dry run's "will be
    skipped"), else the per-slide cap (`job.tile_cap`) with the whole slide taken for tissue,
    an upper bound. Remote slides and those that do not open are left out (as asked)."""
    from .job import tile_target
    from .slides import Slide, SlideError

    p = plan.params
    limits: dict[str, dict[str, int]] = {}
    for spec in plan.slides:
        if not is_local(spec.path) or not os.path.exists(local_path(spec.path)):
            continue
        try:
            with Slide(local_path(spec.path), mpp_override=spec.mpp) as slide:
                area = float(slide.width) * slide.height
                limits[spec.path] = {}
                for mpp in p.mpps:
                    target = tile_target(slide, p, mpp)
                    limits[spec.path][f"{mpp:g}"] = (
                        0 if target is None else int(p.max_coverage * area / target.extent ** 2))
        except SlideError:
            continue
    return limits


def _wall_hours(job_tiles: list[int], workers: int, rate: float) -> float:
    """Makespan of the jobs on ``workers`` cores, longest job first onto the least loaded core
    (jobs are the unit of work: one job runs on one core)."""
    loads = [0.0] * min(workers, max(1, len(job_tiles)))
    for tiles in sorted(job_tiles, reverse=True):
        heapq.heapreplace(loads, loads[0] + tiles / rate)
    return max(loads) / 3600


def estimate(plan: Plan, nodes: int = DEFAULT_NODES, cores_per_node: int = DEFAULT_CORES_PER_NODE,
             sizes: dict[str, int | None] | None = None,
             limits: dict[str, dict[str, int]] | None = None) -> dict:
    """The cost model of ``plan``: tiles as asked, lowered to ``limits`` (`slide_limits`)
    where given; shortfalls only make it cheaper."""
    p = plan.params
    limits = limits or {}
    per_mpp = {f"{m:g}": 0 for m in p.mpps}
    job_tiles = []
    asked = limited = 0
    for job in plan.jobs:
        n = 0
        for s in job.slides:
            for mpp, q in s.quotas.items():
                asked += q
                if mpp in limits.get(s.path, {}) and limits[s.path][mpp] < q:
                    q, limited = limits[s.path][mpp], limited + 1
                per_mpp[mpp] = per_mpp.get(mpp, 0) + q
                n += q
        job_tiles.append(n)
    tiles = sum(job_tiles)
    slow, fast = tiles_per_core_s(p.tile_size)
    workers = nodes * cores_per_node
    sizes = sizes if sizes is not None else slide_sizes([s.path for s in plan.slides])
    known = [v for v in sizes.values() if v is not None]
    stored = sum(n * bytes_per_tile(p.tile_size, float(m)) for m, n in per_mpp.items())
    wall = {"low": _wall_hours(job_tiles, workers, fast), "high": _wall_hours(job_tiles, workers, slow)}
    busy_nodes = min(nodes, max(1, math.ceil(len(job_tiles) / cores_per_node)))
    return {
        "slides": len(plan.slides),
        "jobs": len(plan.jobs),
        "tiles": tiles,
        "tiles_asked": asked,
        "limited": limited,  # (slide, µm/px) whose quota was lowered: capped, or skipped
        "tiles_per_mpp": per_mpp,
        "tiles_per_job": {"min": min(job_tiles, default=0), "mean": round(tiles / max(1, len(job_tiles)), 1),
                          "max": max(job_tiles, default=0)},
        "shard_size": p.shard_size,
        "shards": sum(math.ceil(n / p.shard_size) for n in job_tiles),
        "tiles_per_core_s": {"slow": round(slow, 1), "fast": round(fast, 1)},
        "core_hours": {"low": tiles / fast / 3600, "high": tiles / slow / 3600},
        "nodes": nodes,
        "cores_per_node": cores_per_node,
        "wall_hours": wall,
        "slide_bytes": sum(known),
        # what each busy node must read to keep its cores busy (slides on object storage or a shared FS)
        "read_bytes_per_s_per_node": {k: sum(known) / (h * 3600) / busy_nodes if h else 0.0
                                      for k, h in wall.items()},
        "slides_of_unknown_size": len(sizes) - len(known),
        "storage_bytes": round(stored),
        "bytes_per_tile": round(stored / tiles) if tiles else None,
    }


def format_estimate(e: dict) -> str:
    mix = ", ".join(f"{m}: {n:,}" for m, n in e["tiles_per_mpp"].items())
    unknown = e["slides_of_unknown_size"]
    egress = (f"{size(e['slide_bytes'])} (the slide files, each read once)" if not unknown else
              f"at least {size(e['slide_bytes'])}: {unknown} of {e['slides']} slides of unknown size "
              "(not found; --slide-sizes takes a GDC manifest)")
    rate, core, wall = e["tiles_per_core_s"], e["core_hours"], e["wall_hours"]
    per_job = e["tiles_per_job"]
    return "\n".join([
        "cost model (no pixels read; rates and shard bytes measured, see BENCHMARKS.md):",
        f"  slides, jobs   {e['slides']:,} slides in {e['jobs']:,} jobs",
        f"  tiles          {e['tiles']:,} asked ({mix}); per job {per_job['min']:,}-{per_job['max']:,}"
        if not e.get("limited") else
        f"  tiles          at most {e['tiles']:,} ({mix}) of {e['tiles_asked']:,} asked; per job "
        f"{per_job['min']:,}-{per_job['max']:,} ({e['limited']} slide x µm/px lowered: µm/px a "
        "slide cannot give, or the per-slide cap, max_coverage x slide area / tile area)",
        f"  shards         {e['shards']:,} of at most {e['shard_size']:,} tiles, {e['jobs']:,} manifests",
        f"  CPU            {core['low']:.3g}-{core['high']:.3g} core-hours "
        f"(at {rate['fast']:.0f}-{rate['slow']:.0f} tiles/s per core)",
        f"  wall time      {duration(wall['low'] * 3600)} to {duration(wall['high'] * 3600)} on "
        f"{e['nodes']} node(s) x {e['cores_per_node']} cores, if the slides arrive fast enough",
        f"  slides read    {egress}; to keep the cores busy each node reads "
        f"{size(e['read_bytes_per_s_per_node']['high'])}/s to {size(e['read_bytes_per_s_per_node']['low'])}/s",
        f"  shards stored  {size(e['storage_bytes'])} ({e['bytes_per_tile'] or 0:,} bytes per tile)",
    ])

"""One build job: for each of its slides, mask -> sample -> read -> filter -> encode; then shuffle
all its tiles together, write shards, and write the manifest LAST as the job's commit marker."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from . import shards
from .hsv import hsv_fraction
from .locks import HOST, pid_alive
from .plan import BuildParams, JobSpec, SlideSpec
from .sampling import candidate_positions, slide_rng
from .slides import Level, Slide, SlideError, downscale, read_size_for
from .staging import SlideCache, Staged, StagingError, default_cache
from .tissue import ForegroundMap, dark_background, tissue_mask

# The smallest tile should cover about this many mask pixels across (>= 3 needed for the
# integral-image foreground check to be meaningful).
MASK_CELLS_PER_TILE = 4
# A slide whose reads keep failing is given up after this many (a truncated file, say).
MAX_READ_ERRORS = 20

# Scratch directories (tiles of a running job) in the temporary directory ($TMPDIR): named so a
# later run can tell them, and hold their owner in OWNER_FILE.
SCRATCH_PREFIX = "midnight-prep-"
OWNER_FILE = "owner.json"

# Candidates are drawn, read and filtered in chunks of at most this many (see _sample_slide).
CHUNK = 256

Progress = Callable[[str, int], None]


def _count(report: SlideReport, reason: str) -> None:
    report.rejected[reason] = report.rejected.get(reason, 0) + 1


@dataclass
class SlideReport:
    slide_id: str
    source: str
    status: str = "ok"  # ok | failed
    error: str | None = None
    mpp: float | None = None
    mpp_source: str | None = None
    asked: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count, all magnifications
    skipped_mpps: dict[str, str] = field(default_factory=dict)  # µm/px -> reason
    capped: dict[str, int] = field(default_factory=dict)  # µm/px -> most tiles the tissue allows


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=2)  # 2 = 4:2:0
    return buf.getvalue()


def mask_mpp(slide: Slide, params: BuildParams) -> float:
    """µm/px of the tissue mask: the smallest tile spans MASK_CELLS_PER_TILE cells."""
    smallest_fov = params.tile_size * min(params.mpps)  # µm
    return max(slide.mpp, smallest_fov / MASK_CELLS_PER_TILE)


def slide_mask(slide: Slide, params: BuildParams) -> tuple[np.ndarray, float]:
    """The slide's tissue mask (a thumbnail read: the costly part of a slide's set-up) and its
    cell side in level-0 pixels. SlideError for a slide that is not brightfield (a dark
    background: fluorescence), for the builder and online sampling alike."""
    mpp = mask_mpp(slide, params)
    rgb = np.concatenate(list(slide.thumbnail_strips(mpp)), axis=0)
    dark = dark_background(rgb)
    if dark is not None:
        raise SlideError(
            f"not a brightfield (H&E) slide: its background is dark (median brightness "
            f"{dark:.0f} of 255), as in fluorescence; skipped (tiles of it would pass the colour "
            "filter as stained tissue)")
    return tissue_mask(rgb), mpp / slide.mpp


def foreground_map(slide: Slide, params: BuildParams) -> ForegroundMap:
    """Integral image of the tissue mask (`slide_mask`)."""
    mask, cell = slide_mask(slide, params)
    return ForegroundMap.from_mask(mask, cell)


def tile_cap(fg: ForegroundMap, slide: Slide, extent: float, params: BuildParams) -> int:
    """Most tiles of side ``extent`` (level-0 pixels) one magnification may take from a slide:
    ``max_coverage`` x the area tiles come from / the tile area, i.e. on average each point lies
    in at most ``max_coverage`` tiles. At 16, a tile has on average 0.16 others shifted by less
    than 5 % of its side (16 x 0.1²), so near-duplicates stay rare, while a typical slide still
    gives thousands of tiles at 0.5 µm/px. It bounds the time and scratch space a huge quota
    would take. Tiles come from the tissue (the mask's area), or from anywhere when the
    foreground test asks for none."""
    area = fg.area if params.foreground > 0 else float(slide.width) * slide.height
    return int(params.max_coverage * area / (extent * extent))


@dataclass
class Target:
    """One (slide, µm/px) to sample: the level read, the read size there, and the tiles wanted
    (the builder's quota; online sampling leaves it 0)."""

    mpp: float
    level: Level
    read_size: int
    extent: float  # tile side in level-0 pixels
    quota: int = 0

    def corner(self, x0: int, y0: int) -> tuple[int, int]:
        """A level-0 corner on the level's pixel grid, kept inside the level."""
        ds = self.level.downsample
        return (min(int(x0 / ds), self.level.width - self.read_size),
                min(int(y0 / ds), self.level.height - self.read_size))

    def level0(self, xl: int, yl: int) -> tuple[int, int]:
        """The level-0 position a tile is known by (its key's x, y) from its level corner."""
        ds = self.level.downsample
        return round(xl * ds), round(yl * ds)

    def from_level0(self, x: int, y: int) -> tuple[int, int]:
        """The level corner of the tile known by level-0 (x, y): inverts `level0` exactly
        (downsamples are >= 1)."""
        ds = self.level.downsample
        return round(x / ds), round(y / ds)


def tile_target(slide: Slide, params: BuildParams, mpp: float, quota: int = 0) -> Target | None:
    """Where tiles of ``mpp`` are read (level, read size, level-0 extent); None when the slide
    cannot give ``mpp`` without upsampling by more than ``params.mpp_tolerance``."""
    level = slide.level_for(mpp, params.mpp_tolerance)
    if level is None:
        return None
    extent = params.tile_size * mpp / slide.mpp
    return Target(mpp, level, read_size_for(params.tile_size, mpp, level.mpp), extent, quota)


def _target(slide: Slide, fg: ForegroundMap, spec: SlideSpec, params: BuildParams, mpp: float,
            report: SlideReport) -> Target | None:
    """What to sample at ``mpp``; None when nothing is asked or the slide cannot give it (noted
    in ``report``). A quota above the tissue's cap is lowered to it (noted too)."""
    mkey = f"{mpp:g}"
    quota = spec.quotas.get(mkey, 0)
    if quota <= 0:
        return None
    target = tile_target(slide, params, mpp, quota)
    if target is None:
        report.skipped_mpps[mkey] = (
            f"finest level is {slide.levels[0].mpp:.3g} µm/px, coarser than {mpp:g} µm/px "
            f"by more than the {params.mpp_tolerance:.0%} allowed upsampling")
        return None
    cap = tile_cap(fg, slide, target.extent, params)
    if cap < quota:
        report.capped[mkey] = cap
        target.quota = cap
    return target


def _draw(positions, target: Target, seen: set[tuple[int, int]], want: int, budget: int,
          report: SlideReport) -> tuple[list[tuple[int, int, float]], int]:
    """Up to ``want`` candidates in random order: level-grid corners not drawn before, with
    their foreground fraction; and the budget left (duplicates spend it too, so a tiny slide
    cannot loop forever)."""
    chunk = []
    for x0, y0, frac in positions:
        budget -= 1
        corner = target.corner(x0, y0)
        if corner in seen:
            _count(report, "duplicate")
        else:
            seen.add(corner)
            chunk.append((*corner, frac))
        if len(chunk) >= want or budget <= 0:
            break
    return chunk, budget


def cut_tile(slide: Slide, target: Target, xl: int, yl: int, tile_size: int) -> np.ndarray:
    """The uint8 RGB tile (before JPEG encoding) at level corner (xl, yl) of ``target``: the
    read there, downscaled to ``tile_size``. The one definition of a tile's pixels, for the
    builder and for online sampling alike. Raises SlideError."""
    size = target.read_size
    return downscale(slide.read_level(target.level.index, xl, yl, size, size), tile_size)


class TileReader:
    """Reads and filters candidate tiles of one slide; gives the slide up after MAX_READ_ERRORS
    failed reads (a truncated file, say)."""

    def __init__(self, slide: Slide, params: BuildParams, errors: int = 0):
        self.slide, self.params, self.errors = slide, params, errors

    def tile(self, target: Target, xl: int, yl: int) -> np.ndarray | SlideError:
        """`cut_tile`, or the SlideError of a failed read (counted); raises SlideError once
        MAX_READ_ERRORS reads have failed."""
        try:
            return cut_tile(self.slide, target, xl, yl, self.params.tile_size)
        except SlideError as e:
            self.errors += 1
            if self.errors >= MAX_READ_ERRORS:
                raise SlideError(f"gave up after {self.errors} failed reads; last: {e}") from e
            return e

    def read(self, target: Target, chunk: list[tuple[int, int, float]]) -> list:
        """(tile, HSV fraction) or the SlideError of each candidate, in ``chunk``'s order. Reads
        go in raster order, so overlapping reads share cached source tiles."""
        size = target.read_size
        results: list = [None] * len(chunk)
        for i in sorted(range(len(chunk)), key=lambda i: (chunk[i][1] // size, chunk[i][0])):
            xl, yl, _ = chunk[i]
            tile = self.tile(target, xl, yl)
            results[i] = tile if isinstance(tile, SlideError) else (tile, hsv_fraction(tile))
        return results


def _accept(target: Target, chunk: list, results: list, room: int, spec: SlideSpec,
            params: BuildParams, report: SlideReport, emit: Callable[[str, bytes, dict], None],
            progress: Progress | None) -> int:
    """Emit the tiles that pass the HSV filter, in draw order (so stopping at the quota favours
    no part of the slide), at most ``room``; return how many."""
    ds, written = target.level.downsample, 0
    for (xl, yl, frac), result in zip(chunk, results):
        if written >= room:
            break
        if isinstance(result, SlideError):
            _count(report, "read_error")
            continue
        tile, hf = result
        if hf < params.hsv_min_fraction:
            _count(report, "hsv")
            continue
        x, y = target.level0(xl, yl)
        meta = {
            "slide_id": spec.slide_id, "source": spec.path, "mpp": target.mpp, "x": x, "y": y,
            "extent": round(target.read_size * ds, 3), "level": target.level.index,
            "read_size": target.read_size, "tile_size": params.tile_size,
            "foreground": round(frac, 4), "hsv_fraction": round(hf, 4), "group": spec.group,
            "seed": params.seed,
        }
        emit(shards.sample_key(spec.slide_id, target.mpp, x, y), encode_jpeg(tile, params.jpeg_quality), meta)
        written += 1
        if progress:
            progress("tiles", 1)
    return written


def _sample_slide(slide: Slide, spec: SlideSpec, params: BuildParams, report: SlideReport,
                  emit: Callable[[str, bytes, dict], None], progress: Progress | None) -> None:
    """Per magnification, chunk by chunk: draw candidates -> read them -> accept, until the
    quota is met or the read budget (read_budget_factor x quota + 64) is spent."""
    fg = foreground_map(slide, params)
    reader = TileReader(slide, params)
    for mpp in params.mpps:
        target = _target(slide, fg, spec, params, mpp, report)
        if target is None:
            continue
        rng = slide_rng(params.seed, spec.slide_id, mpp)
        positions = candidate_positions(fg, slide.width, slide.height, target.extent,
                                        params.foreground, rng, report.rejected)
        budget = int(params.read_budget_factor * target.quota) + 64
        seen: set[tuple[int, int]] = set()
        written = 0
        while written < target.quota and budget > 0:
            want = min(CHUNK, max(8, (target.quota - written) * 3 // 2))
            chunk, budget = _draw(positions, target, seen, want, budget, report)
            if not chunk:
                break
            results = reader.read(target, chunk)
            written += _accept(target, chunk, results, target.quota - written, spec, params, report,
                               emit, progress)
        report.written[f"{mpp:g}"] = written


def changed_since_planned(spec: SlideSpec, held: Staged) -> None:
    """SlideError naming the slide when its file is not the one planned (another size, or on
    object storage another ETag): tiles of another file must not pass as the plan's."""
    if spec.size is None:
        return  # a plan of an older version, or a file missing when planned
    if held.size is None:  # a local file
        try:
            size, etag = os.path.getsize(held.path), None
        except OSError:
            return  # missing: Slide() says so
    else:
        size, etag = held.size, held.etag
    if size != spec.size or (spec.etag and etag and etag != spec.etag):
        what = (f"{spec.size} bytes then, {size} now" if size != spec.size
                else f"ETag {spec.etag} then, {etag} now")
        raise SlideError(
            f"{spec.path} (slide {spec.slide_id}) changed since the plan was made ({what}); "
            "put the planned file back, or plan again into a new --output")


def process_slide(spec: SlideSpec, params: BuildParams, emit, progress: Progress | None = None,
                  cache: SlideCache | None = None) -> SlideReport:
    """Sample one slide into ``emit``; every failure is caught and reported, never raised. A
    slide on object storage is staged into ``cache`` (default: `staging.default_cache`) for the
    time it is read, then removed; ``source`` stays its URL."""
    report = SlideReport(spec.slide_id, spec.path, asked=dict(spec.quotas))
    local = spec.path
    try:
        with (cache or default_cache()).acquire(spec.path, keep=False) as held:
            local = held.path
            changed_since_planned(spec, held)
            with Slide(local, mpp_override=spec.mpp) as slide:
                report.mpp, report.mpp_source = slide.mpp, slide.mpp_source
                _sample_slide(slide, spec, params, report, emit, progress)
    except (SlideError, StagingError) as e:
        report.status, report.error = "failed", str(e).replace(local, spec.path)  # not the copy's
    except Exception as e:  # an unexpected library error on one slide must not end the job
        report.status, report.error = "failed", f"{type(e).__name__}: {e}".replace(local, spec.path)
    if progress:  # tiles asked for but not written: lets a progress bar's total shrink to match
        progress("unfilled", sum(report.asked.values()) - sum(report.written.values()))
    return report


def make_scratch(job_id: str, parent: str | None = None) -> str:
    """A fresh scratch directory for a job, marked with this process as its owner."""
    path = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{job_id}-", dir=parent)
    with open(os.path.join(path, OWNER_FILE), "w") as f:
        json.dump({"host": HOST, "pid": os.getpid()}, f)
    return path


def clean_stale_scratch(parent: str | None = None) -> list[str]:
    """Remove scratch directories whose owner, a process of this host, is gone (killed before
    it could clean up); return their paths."""
    parent = parent or tempfile.gettempdir()
    removed = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not name.startswith(SCRATCH_PREFIX):
            continue
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue  # not ours, or still being made
        if owner.get("host") == HOST and isinstance(owner.get("pid"), int) and not pid_alive(owner["pid"]):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def run_job(job: JobSpec, params: BuildParams, output: str, plan_sha256: str,
            progress: Progress | None = None, scratch: str | None = None) -> dict:
    """Run one job from scratch and return its manifest (also written to the output, last). The
    manifest records ``plan_sha256`` (the plan's identity, `Plan.sha256`)."""
    started, cpu_started = time.time(), time.process_time()
    # A job being redone (damaged shards, say) reads as not done until its new manifest is in.
    shards.remove(shards.join(output, shards.manifest_name(job.job_id)))
    tmp = make_scratch(job.job_id, scratch)
    try:
        # Tiles spill to a local file (not memory) until the whole job is shuffled.
        spill_path = os.path.join(tmp, "tiles.bin")
        records: list[tuple[int, int, str, dict]] = []
        with open(spill_path, "wb") as spill:
            def emit(key: str, jpeg: bytes, meta: dict) -> None:
                records.append((spill.tell(), len(jpeg), key, meta))
                spill.write(jpeg)

            reports = []
            for spec in job.slides:
                reports.append(process_slide(spec, params, emit, progress))
                if progress:
                    progress("slides", 1)

        written = _write_shards(job.job_id, params, output, tmp, spill_path, records)
        manifest = {
            "job_id": job.job_id,
            "plan_sha256": plan_sha256,
            "shards": written,
            "samples": len(records),
            "slides": [report.__dict__ for report in reports],
            "errors": [{"slide_id": r.slide_id, "source": r.source, "error": r.error}
                       for r in reports if r.status == "failed"],
            "started_at": round(started, 3),  # epoch seconds: `status` derives throughput
            "finished_at": round(time.time(), 3),
            "seconds": round(time.time() - started, 3),
            "cpu_seconds": round(time.process_time() - cpu_started, 3),
        }
        shards.publish_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode(),
                             shards.join(output, shards.manifest_name(job.job_id)))
        _remove_stale_shards(output, job.job_id, first=len(written))
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_shards(job_id: str, params: BuildParams, output: str, tmp: str, spill_path: str,
                  records: list[tuple[int, int, str, dict]]) -> list[dict]:
    """Shuffle the job's tiles (by seed and job id) into shards, publish each (in the background,
    all stored when this returns); return their manifest entries."""
    order = slide_rng(params.seed, job_id, 0, purpose="shuffle").permutation(len(records))
    written = []
    with open(spill_path, "rb") as spill, shards.Uploads() as uploads:
        def samples(idx):
            for i in idx:
                offset, size, key, meta = records[i]
                spill.seek(offset)
                yield key, spill.read(size), meta

        for k, start in enumerate(range(0, len(order), params.shard_size)):
            name = shards.shard_name(job_id, k)
            local = os.path.join(tmp, f"shard-{k}.tar")
            with open(local, "wb") as f:
                n = shards.write_tar(samples(order[start:start + params.shard_size]), f)
            entry = {"name": name, "samples": n, "bytes": os.path.getsize(local),
                     "sha256": shards.sha256_file(local)}
            uploads.put(local, shards.join(output, name))  # deletes it once stored
            written.append(entry)
    return written


def _remove_stale_shards(output: str, job_id: str, first: int) -> None:
    """Delete shards an earlier run of this job wrote beyond the ``first`` it has now (a redone
    job can have fewer tiles), so readers that glob *.tar see no stale tiles. Earlier runs
    numbered theirs from 0 too, so the stale ones follow on without a gap."""
    k = first
    while shards.exists(shards.join(output, shards.shard_name(job_id, k))):
        shards.remove(shards.join(output, shards.shard_name(job_id, k)))
        k += 1

"""Slide list -> plan: build parameters plus independent jobs (groups of slides with per-slide,
per-magnification quotas). A plan is plain JSON so any engine (local pool, SLURM array, Ray) can
run any subset of its jobs on any machine."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec

from .shards import JPEG_QUALITY, canonical, folder_of, is_local, local_path, safe_slide_id
from .slides import PLAUSIBLE_MPP
from .storage import PERMANENT, StorageError, etag_of, is_transient, probe, storage_message

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif",
                    ".svslide")
PLAN_VERSION = 1


class PlanError(Exception):
    """The inputs cannot be planned; the message says what to fix."""


# Tile sides allowed: a smaller tile makes the tissue mask (4 cells per smallest tile) needlessly
# fine and large; a larger one is far beyond what the training crops use.
TILE_SIZE_RANGE = (32, 8192)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(ok: bool, rule: str, value) -> None:
    """Raise PlanError "RULE, got VALUE" unless ``ok``."""
    if not ok:
        raise PlanError(f"{rule}, got {value!r}")


@dataclass(frozen=True)
class BuildParams:
    mpps: tuple[float, ...] = (2.0, 1.0, 0.5, 0.25)
    tile_size: int = 256
    seed: int = 0
    foreground: float = 0.4
    hsv_min_fraction: float = 0.6
    shard_size: int = 1000
    mpp_tolerance: float = 0.05
    jpeg_quality: int = JPEG_QUALITY
    # Reads allowed per (slide, magnification): budget_factor * quota + 64. Bounds the time spent
    # on slides whose tissue mostly fails the colour filter.
    read_budget_factor: float = 8.0
    # Tiles per (slide, µm/px) are capped at max_coverage * tissue area / tile area: on average
    # each tissue point lies in at most this many tiles of one magnification (see job.tile_cap).
    max_coverage: float = 16.0

    def __post_init__(self) -> None:
        """Refuse values that would lose tiles or fail later with an unrelated message (checked
        for the command line and for a hand-edited plan.json alike)."""
        lo, hi = PLAUSIBLE_MPP
        require(len(self.mpps) > 0, "--mpp needs at least one µm/px", self.mpps)
        for mpp in self.mpps:
            require(_real(mpp) and lo <= mpp <= hi,
                    f"--mpp: each µm/px must be a number in [{lo:g}, {hi:g}]", mpp)
        # Sample keys tell magnifications apart to 0.001 µm/px: the same one twice would write
        # every tile twice under the same key.
        require(len({round(m * 1000) for m in self.mpps}) == len(self.mpps),
                "--mpp: give each magnification once (they are told apart to 0.001 µm/px)",
                ",".join(f"{m:g}" for m in self.mpps))
        lo_px, hi_px = TILE_SIZE_RANGE
        require(_whole(self.tile_size) and lo_px <= self.tile_size <= hi_px,
                f"--tile-size must be a whole number of pixels in [{lo_px}, {hi_px}]", self.tile_size)
        require(_whole(self.seed) and self.seed >= 0, "--seed must be a whole number >= 0", self.seed)
        require(_real(self.foreground) and 0 <= self.foreground <= 1,
                "--foreground is the tissue fraction a tile needs: a number in [0, 1]", self.foreground)
        require(_real(self.hsv_min_fraction) and 0 <= self.hsv_min_fraction <= 1,
                "--hsv-min-fraction is a fraction of a tile's pixels: a number in [0, 1]",
                self.hsv_min_fraction)
        require(_whole(self.shard_size) and self.shard_size >= 1,
                "--shard-size (samples per shard) must be a whole number >= 1", self.shard_size)
        require(_real(self.mpp_tolerance) and 0 <= self.mpp_tolerance < 1,
                "mpp_tolerance (plan.json) must be a number in [0, 1)", self.mpp_tolerance)
        require(_whole(self.jpeg_quality) and 1 <= self.jpeg_quality <= 100,
                "jpeg_quality (plan.json) must be a whole number in [1, 100]", self.jpeg_quality)
        require(_real(self.read_budget_factor) and self.read_budget_factor > 0,
                "read_budget_factor (plan.json) must be a number > 0", self.read_budget_factor)
        require(_real(self.max_coverage) and self.max_coverage > 0,
                "max_coverage (plan.json) must be a number > 0", self.max_coverage)

    @classmethod
    def from_dict(cls, d: dict) -> BuildParams:
        d = dict(d)
        d["mpps"] = tuple(float(m) for m in d["mpps"])
        return cls(**d)


@dataclass
class SlideSpec:
    path: str
    slide_id: str
    group: str = "default"
    mpp: float | None = None  # override, used only when the file has no usable µm/px
    quotas: dict[str, int] = field(default_factory=dict)  # str(µm/px) -> tiles
    # The file as planned (None: not known, as in plans of older versions): a run refuses a
    # slide whose size (or, on object storage, ETag) changed since. Not part of the plan's
    # hash: they say which file, not what is built from it.
    size: int | None = None
    etag: str | None = None


# SlideSpec fields left out of Plan.sha256 (see above): a copied or older plan keeps its hash.
UNHASHED = ("size", "etag")


@dataclass
class JobSpec:
    job_id: str
    slides: list[SlideSpec]


@dataclass
class Plan:
    # The output the plan was made for (absolute, or a URL). A plan read back from OUT/plan.json
    # works on the folder it was read from instead, so a moved output or another working
    # directory never sends results elsewhere; the hash leaves it out.
    output: str
    params: BuildParams
    jobs: list[JobSpec]
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    def sha256(self) -> str:
        """Identity of what the plan builds (version, params, jobs with their slides and quotas),
        not of where: the same plan given as ./out or /abs/out, or moved, keeps its hash. Every
        manifest records it, so results of another plan are never taken as done."""
        jobs = [asdict(job) for job in self.jobs]
        for job in jobs:
            for slide in job["slides"]:
                for name in UNHASHED:
                    slide.pop(name)
        content = {"version": self.version, "params": asdict(self.params), "jobs": jobs}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')} is not {PLAN_VERSION}; re-plan")
        jobs = [JobSpec(j["job_id"], [SlideSpec(**s) for s in j["slides"]]) for j in d["jobs"]]
        return cls(d["output"], BuildParams.from_dict(d["params"]), jobs)

    @property
    def slides(self) -> list[SlideSpec]:
        return [s for job in self.jobs for s in job.slides]


def mpp_key(mpp: float) -> str:
    return f"{mpp:g}"


def _row(path: str, slide_id: str | None = None, group: str | None = None, mpp: str | None = None) -> dict:
    return {"path": path, "slide_id": slide_id or None, "group": group or None,
            "mpp": float(mpp) if mpp not in (None, "") else None}


def read_slide_list(csv_path: Path | str) -> list[dict]:
    """Rows of a slide list CSV (a local file or an fsspec URL): column ``path`` (absolute, a
    URL, or relative to the CSV), optional ``slide_id``, ``mpp`` (override) and ``group``."""
    remote = not is_local(str(csv_path))
    try:
        # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column name
        with fsspec.open(str(csv_path), "rt", newline="", encoding="utf-8-sig") if remote else \
                open(csv_path, newline="", encoding="utf-8-sig") as f:
            return _slide_rows(csv_path, csv.DictReader(f), remote)
    except (PlanError, StorageError):
        raise
    except FileNotFoundError as e:
        raise PlanError(f"{csv_path}: no such slide list") from e
    except Exception as e:
        if remote and (is_transient(e) or isinstance(e, PERMANENT)):
            raise StorageError(storage_message(str(csv_path), e)) from e
        raise


def _slide_rows(csv_path, reader: csv.DictReader, remote: bool) -> list[dict]:
    if not reader.fieldnames or "path" not in reader.fieldnames:
        raise PlanError(f"{csv_path}: a slide list needs a 'path' column (got {reader.fieldnames})")
    unknown = set(reader.fieldnames) - {"path", "slide_id", "mpp", "group"}
    if unknown:
        raise PlanError(f"{csv_path}: unknown columns {sorted(unknown)}; allowed: path, slide_id, mpp, group")
    rows = []
    for n, r in enumerate(reader, start=2):
        p = (r.get("path") or "").strip()
        if not p:
            raise PlanError(f"{csv_path}:{n}: empty path")
        if p.startswith("file://"):
            p = local_path(p)
        if "://" not in p and not posixpath.isabs(p):
            if remote:  # relative to the CSV's folder in the same store
                scheme, _, where = folder_of(str(csv_path)).partition("://")
                p = f"{scheme}://{posixpath.normpath(posixpath.join(where, p))}"
            else:
                p = os.path.abspath(Path(csv_path).parent / p)
        try:
            row = _row(p, r.get("slide_id"), r.get("group"), r.get("mpp"))
        except ValueError:
            row = {"mpp": math.nan}
        lo, hi = PLAUSIBLE_MPP
        if row["mpp"] is not None and not (_real(row["mpp"]) and lo <= row["mpp"] <= hi):
            raise PlanError(f"{csv_path}:{n}: mpp {r.get('mpp')!r} is not a valid µm/px: give a "
                            f"number in [{lo:g}, {hi:g}], or leave it empty to use the slide's own")
        rows.append(row)
    return rows


def _remote_slides(url: str) -> list[str]:
    """The slide URLs at ``url``: the object itself, or every slide file under the prefix (by
    extension, recursively, as for a local directory)."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        if fs.isdir(path):
            found = sorted(p for p in fs.find(path)
                           if posixpath.splitext(p)[1].lower() in SLIDE_EXTENSIONS)
            if not found:
                raise PlanError(f"{url}: no slide files ({', '.join(SLIDE_EXTENSIONS)}) under this prefix")
            return [fs.unstrip_protocol(p) for p in found]
        if fs.isfile(path):
            return [canonical(url)]
    except PlanError:
        raise
    except Exception as e:
        if is_transient(e) or isinstance(e, PERMANENT):
            raise StorageError(storage_message(url, e, "list")) from e
        raise
    raise PlanError(f"{url}: no such object or prefix")


def collect_inputs(inputs: list[str]) -> list[dict]:
    """Slide rows from files, directories (searched recursively by extension), CSV lists, and
    the same on object storage (URLs: an object, a prefix, a CSV). Local paths are made absolute
    but links are kept: a symlinked slide is known by the link's name."""
    rows: list[dict] = []
    for item in inputs:
        if item.lower().endswith(".csv"):
            rows += read_slide_list(item if not is_local(item) else Path(local_path(item)))
            continue
        if not is_local(item):
            rows += [_row(url) for url in _remote_slides(item)]
            continue
        p = Path(local_path(item))
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in SLIDE_EXTENSIONS)
            if not found:
                raise PlanError(f"{item}: no slide files ({', '.join(SLIDE_EXTENSIONS)}) in this directory")
            rows += [_row(os.path.abspath(f)) for f in found]
        elif p.exists():
            rows.append(_row(os.path.abspath(p)))
        else:
            raise PlanError(f"{item}: no such file or directory")
    if not rows:
        raise PlanError("no slides given")
    return rows


def file_stamp(path: str) -> tuple[int, str | None]:
    """(bytes, ETag or None) of a slide file as it is now; raises OSError (or the store's
    error) when it cannot be looked at."""
    if is_local(path):
        return os.path.getsize(local_path(path)), None
    fs, where = fsspec.core.url_to_fs(path)
    fs.invalidate_cache(where)
    info = fs.info(where)
    return int(info["size"]), etag_of(info)


def stamp_files(slides: list[SlideSpec]) -> None:
    """Record each slide's size (and ETag) in its spec; a slide that cannot be looked at now
    (missing: the run reports it as a failed slide) is left unknown. Remote slides are looked
    at in parallel after one quick look at their store, so a store that is down is reported in
    seconds."""
    remote = [s for s in slides if not is_local(s.path)]
    if remote:
        probe(remote[0].path)  # the object, not its folder: no listing of a large prefix

    def stamp(spec: SlideSpec) -> None:
        try:
            spec.size, spec.etag = file_stamp(spec.path)
        except Exception as e:
            if is_transient(e):
                raise StorageError(storage_message(spec.path, e, "look at")) from e
            spec.size = spec.etag = None  # missing or unreadable: the run says why

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(stamp, slides))


def merge_rows(rows: list[dict]) -> list[dict]:
    """One row per path: a slide given twice (a folder and a slide list naming some of its
    slides to set their µm/px, say) is one slide, with the values given (a list's) over the
    blanks (a folder's). PlanError when the two give different values (one file under two
    slide ids)."""
    merged: dict[str, dict] = {}
    for row in rows:
        first = merged.setdefault(row["path"], dict(row))
        for name, value in row.items():
            if value is None or name == "path":
                continue
            if first[name] is not None and first[name] != value:
                raise PlanError(
                    f"{row['path']} is given twice with different {name} values, {first[name]!r} "
                    f"and {value!r}; give each slide once (one {name} per file)")
            first[name] = value
    return list(merged.values())


def split_evenly(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def make_plan(
    inputs: list[str],
    output: str,
    params: BuildParams,
    tiles_per_slide: int | None = None,
    total_tiles: int | None = None,
    slides_per_job: int = 8,
    group: str = "default",
) -> Plan:
    """Group slides (sorted by id, so the plan does not depend on input order) into jobs and give
    each slide its quota, spread evenly over the magnifications."""
    if (tiles_per_slide is None) == (total_tiles is None):
        raise PlanError("give exactly one of --tiles-per-slide or --total-tiles")
    for option, value in (("--tiles-per-slide", tiles_per_slide), ("--total-tiles", total_tiles)):
        if value is not None:
            require(_whole(value) and value >= 1, f"{option} must be a whole number >= 1", value)
    require(_whole(slides_per_job) and slides_per_job >= 1,
            "--slides-per-job must be a whole number >= 1", slides_per_job)
    rows = merge_rows(collect_inputs(inputs))
    seen: dict[str, str] = {}
    slides = []
    for r in rows:
        # A URL's last part names it as a file's name does: an s3 copy of a folder gets its ids.
        sid = safe_slide_id(r["slide_id"] or posixpath.basename(r["path"]).split(".")[0])
        if sid in seen:
            raise PlanError(
                f"slide id {sid!r} is used by both {seen[sid]} and {r['path']}; give unique "
                "'slide_id' values in a slide list CSV")
        seen[sid] = r["path"]
        slides.append(SlideSpec(r["path"], sid, safe_slide_id(r["group"] or group), r["mpp"]))
    slides.sort(key=lambda s: s.slide_id)
    per_slide = (split_evenly(total_tiles, len(slides)) if total_tiles is not None
                 else [tiles_per_slide] * len(slides))
    for s, n in zip(slides, per_slide):
        s.quotas = {mpp_key(m): q for m, q in zip(params.mpps, split_evenly(n, len(params.mpps)))}
    stamp_files(slides)
    jobs = [JobSpec(f"job-{i // slides_per_job:06d}", slides[i:i + slides_per_job])
            for i in range(0, len(slides), slides_per_job)]
    return Plan(canonical(output), params, jobs)

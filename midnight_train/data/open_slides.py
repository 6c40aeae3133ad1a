"""The slides of a slide source and what is kept of them while a stream draws: the slide lists
(planned as `midnight-prep` plans them), opening (remote slides staged first, `data.stage_dir`),
tissue masks (`MaskStore`: packed in memory, optionally on disk for a node, `data.mask_cache_dir`)
and the open slides themselves (`SlideEntry` with its per-µm/px samplers, `OpenSlides`: a bounded
LRU, no handle leaks)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from midnight_prep import tissue
from midnight_prep.job import Target, TileReader, mask_mpp, slide_mask, tile_target
from midnight_prep.plan import BuildParams, PlanError, SlideSpec, make_plan
from midnight_prep.sampling import TissueSampler
from midnight_prep.shards import is_local, safe_slide_id
from midnight_prep.slides import Slide, SlideError
from midnight_prep.staging import SlideCache, Staged
from midnight_prep.tissue import ForegroundMap
from midnight_train.data.config import DataConfig

log = logging.getLogger(__name__)

LISTED_FOLDERS = 256  # at start, the remote folders listed for slide sizes (the staging check)
PROBE_SLIDES = 8  # at start, the first of this many slides of each dataset must open
MASK_MEMORY_BYTES = 64 << 20  # packed masks of closed slides kept in memory, per stream
# Changes when the tissue mask algorithm does: on-disk masks of an older one are not reused.
MASK_VERSION = hashlib.sha256(Path(tissue.__file__).read_bytes()).hexdigest()[:12]


@dataclass
class SlideDataset:
    name: str
    weight: float
    slides: list[SlideSpec]


def slide_datasets(cfg: DataConfig) -> list[SlideDataset]:
    """The slide lists of a slide source: ids, groups and µm/px overrides exactly as
    `midnight-prep` plans them (sorted by id; ``group`` keeps only that group's slides)."""
    out = []
    for i, spec in enumerate(cfg.dataset_specs()):
        name = str(spec.get("name") or f"dataset{i}")
        inputs = spec["slides"] if isinstance(spec["slides"], list) else [spec["slides"]]
        try:
            # The builder's own planning gives the ids (dot-free, unique), groups and overrides;
            # the output and quotas are never used.
            slides = make_plan([str(x) for x in inputs], "unused", BuildParams(),
                               tiles_per_slide=1, slides_per_job=1 << 30).slides
        except PlanError as err:
            raise ValueError(f"data.slides (dataset {name!r}): {err}") from None
        if spec.get("group") is not None:  # spelt as the builder spells groups
            slides = [s for s in slides if s.group == safe_slide_id(str(spec["group"]))]
            if not slides:
                raise ValueError(f"data.slides (dataset {name!r}): no slide of group {spec['group']!r}")
        out.append(SlideDataset(name, float(spec.get("weight", 1.0)), slides))
    return out


def stage_and_open(spec: SlideSpec, cache: SlideCache) -> tuple[Slide, Staged | None]:
    """The one place online sampling opens a slide. A remote one (``s3://``…) is staged into
    ``cache`` first (OpenSlide reads local files only) and held, so no process evicts it,
    until the returned `Staged` is released; a local path is opened where it is."""
    if is_local(spec.path):
        return Slide(spec.path, mpp_override=spec.mpp), None
    held = cache.acquire(spec.path)
    try:
        return Slide(held.path, mpp_override=spec.mpp), held
    except BaseException:
        held.release()
        raise


@contextmanager
def open_slide(spec: SlideSpec, cache: SlideCache | None = None) -> Iterator[Slide]:
    """A slide open (and staged, if remote) while inside."""
    slide, held = stage_and_open(spec, cache or SlideCache())
    try:
        yield slide
    finally:
        slide.close()
        if held is not None:
            held.release()


def check_slides(datasets: list[SlideDataset], cache: SlideCache | None = None) -> None:
    """Fail fast on a wrong slide list: each dataset must have a slide among its first
    PROBE_SLIDES that opens (others that do not are dropped during training, not here)."""
    for ds in datasets:
        reasons = []
        for spec in ds.slides[:PROBE_SLIDES]:
            try:
                with open_slide(spec, cache):
                    pass
                break
            except Exception as err:  # noqa: BLE001 - any failure to open is the answer
                reasons.append(f"{spec.path}: {err}")
        else:
            raise ValueError(f"data.slides (dataset {ds.name!r}): none of its first "
                             f"{len(reasons)} slides opens: {'; '.join(reasons[:3])}")


def slide_cache(cfg: DataConfig) -> SlideCache:
    """Where remote slides are staged: ``data.stage_dir`` (default: one folder per user in the
    temporary directory) bounded by ``data.stage_max_gb``; storage errors retried for
    ``data.read_retry_s``. Slides stay there for reuse until evicted. A worker waits for cache
    room (other processes' slides) well within ``data.timeout_s``, then fails with the reason."""
    max_bytes = None if cfg.stage_max_gb is None else int(cfg.stage_max_gb * 1e9)
    wait_s = max(1.0, cfg.timeout_s - float(cfg.read_retry_s)) / 2
    return SlideCache(cfg.stage_dir, max_bytes, retry_s=float(cfg.read_retry_s), wait_s=wait_s,
                      keep=True)


def open_capacity(slide_pool: int, n_datasets: int) -> int:
    """The most slides one stream keeps open (and, remote, staged and held): its pools and two
    more (a slide being replaced, a candidate of the tissue weighting)."""
    return slide_pool * n_datasets + 2


def remote_sizes(datasets: list[SlideDataset]) -> dict[str, int]:
    """Bytes of the remote slides, from listings of their folders (at most LISTED_FOLDERS; the
    plan has just listed a prefix, so fsspec answers from its cache). Slides whose folder
    cannot be listed are left out."""
    import fsspec

    folders: dict[str, list[str]] = {}
    for ds in datasets:
        for spec in ds.slides:
            if not is_local(spec.path):
                folders.setdefault(spec.path.rstrip("/").rsplit("/", 1)[0], []).append(spec.path)
    sizes: dict[str, int] = {}
    for folder, urls in list(folders.items())[:LISTED_FOLDERS]:
        try:
            fs, path = fsspec.core.url_to_fs(folder)
            listed = {str(e["name"]).rstrip("/"): e.get("size") for e in fs.ls(path, detail=True)}
        except Exception:  # noqa: BLE001 - no listing: this check cannot help, staging still can
            continue
        for url in urls:
            size = listed.get(fs._strip_protocol(url).rstrip("/"))
            if isinstance(size, int):
                sizes[url] = size
    return sizes


def check_stage_room(cfg: DataConfig, datasets: list[SlideDataset], cache: SlideCache,
                     processes: int) -> None:
    """Refuse at start a slide cache that cannot hold what the loader holds at once: each of
    ``processes`` streams (workers of every training process on this node) keeps up to
    `open_capacity` slides staged, and a full cache makes workers wait for each other."""
    sizes = sorted(remote_sizes(datasets).values(), reverse=True)
    if not sizes:
        return
    capacity = open_capacity(cfg.slide_pool, len(datasets))
    need = min(sum(sizes), processes * sum(sizes[:capacity]))
    if need <= cache.max_bytes:
        return
    gb = math.ceil(need / 1e7) / 100
    raise ValueError(
        f"data.stage_max_gb: the slide cache in {cache.root} ({cache.max_bytes / 1e9:.2f} GB) "
        f"cannot hold the slides the loader keeps staged at once: {processes} loader "
        f"process(es) on this node (data.num_workers, per training process) x up to {capacity} "
        f"open slides each (data.slide_pool x datasets + 2), {need / 1e9:.2f} GB for these "
        f"slides; set data.stage_max_gb={gb:g} or more (data.stage_dir on a disk with that "
        f"room), or lower data.slide_pool or data.num_workers")


class MaskStore:
    """Tissue masks by slide: packed in memory (bounded), and optionally on disk in
    ``directory``, keyed by path, size, mtime and mask parameters, written atomically, so the
    workers and ranks of a node compute each slide's mask once."""

    def __init__(self, directory: str | None, max_bytes: int = MASK_MEMORY_BYTES) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.memory: OrderedDict[str, tuple[np.ndarray, tuple[int, int], float]] = OrderedDict()
        self.computed = 0  # masks computed here (thumbnail reads), for tests and statistics
        if directory:
            os.makedirs(directory, exist_ok=True)

    def _key(self, source: str, slide: Slide, params: BuildParams) -> str:
        # A local slide by path, size and mtime; a remote one by URL and size (its staged
        # copy's mtime is when it was downloaded, which differs between nodes).
        st = os.stat(slide.path)
        where = ([os.path.abspath(source), st.st_size, st.st_mtime_ns] if is_local(source)
                 else [source, st.st_size])
        ident = [MASK_VERSION, *where, slide.mpp, mask_mpp(slide, params)]
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]

    def get(self, source: str, slide: Slide, params: BuildParams) -> tuple[np.ndarray, float]:
        """The tissue mask of ``slide`` (opened from ``source``) and its cell size."""
        key = self._key(source, slide, params)
        hit = self.memory.get(key) or self._load(key)
        if hit is None:
            mask, cell = slide_mask(slide, params)
            self.computed += 1
            hit = (np.packbits(mask), mask.shape, cell)
            self._save(key, hit)
        self.memory[key] = hit
        self.memory.move_to_end(key)
        while sum(v[0].nbytes for v in self.memory.values()) > self.max_bytes and len(self.memory) > 1:
            self.memory.popitem(last=False)
        packed, shape, cell = hit
        return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).astype(bool), cell

    def _path(self, key: str) -> str:
        return os.path.join(self.directory or "", f"{key}.npz")

    def _load(self, key: str):
        if not self.directory or not os.path.exists(self._path(key)):
            return None
        try:
            with np.load(self._path(key)) as z:
                return z["packed"], tuple(int(v) for v in z["shape"]), float(z["cell"])
        except Exception:  # noqa: BLE001 - a damaged entry is recomputed and replaced
            return None

    def _save(self, key: str, hit) -> None:
        if not self.directory:
            return
        packed, shape, cell = hit
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".npz", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, packed=packed, shape=np.array(shape), cell=np.array(cell))
            os.replace(tmp, self._path(key))  # atomic: readers see a whole file or none
        except OSError as err:
            log.warning("cannot write the mask cache %s: %s", self.directory, err)
            if os.path.exists(tmp):
                os.unlink(tmp)


_NO_TISSUE = "no tissue: no tile position has {:.0%} foreground at any of its µm/px"


class SlideEntry:
    """An open slide with what sampling it needs: its reader and, per µm/px it can give, the
    target and the position sampler (built when that µm/px is first drawn: a slide drawn for
    a few tiles does not pay the set-up of all of them)."""

    def __init__(self, spec: SlideSpec, params: BuildParams, masks: MaskStore, read_errors: int,
                 cache: SlideCache):
        slide, self.held = stage_and_open(spec, cache)
        try:
            mask, cell = masks.get(spec.path, slide, params)
            fg = ForegroundMap.from_mask(mask, cell)
            self.targets = [t for t in (tile_target(slide, params, m) for m in params.mpps) if t is not None]
            if not self.targets:
                raise SlideError(
                    f"its finest level is {slide.levels[0].mpp:.3g} µm/px: it cannot give any of "
                    f"{', '.join(f'{m:g}' for m in params.mpps)} µm/px without upsampling by "
                    f"more than {params.mpp_tolerance:.0%}")
            if fg.area == 0:
                raise SlideError(_NO_TISSUE.format(params.foreground))
        except BaseException:
            self.slide = slide
            self.close()
            raise
        self.slide, self.fg, self.foreground = slide, fg, params.foreground
        self.samplers: list[TissueSampler | None] = [None] * len(self.targets)
        self.tissue_mm2 = fg.area * slide.mpp ** 2 / 1e6  # level-0 px² → mm²
        self.reader = TileReader(slide, params, errors=read_errors)

    def _sampler(self, t: int) -> TissueSampler:
        if self.samplers[t] is None:
            self.samplers[t] = TissueSampler(self.fg, self.slide.width, self.slide.height,
                                             self.targets[t].extent, self.foreground)
        return self.samplers[t]

    def choose(self, rng: np.random.Generator) -> tuple[Target, TissueSampler]:
        """A µm/px drawn uniformly among those where some position passes the foreground test
        (one without is drawn again, which keeps the draws a function of the slide alone, not of
        which samplers exist yet); SlideError when there is none."""
        while True:
            t = int(rng.integers(len(self.targets)))
            if not self._sampler(t).empty:
                return self.targets[t], self.samplers[t]
            if all(self._sampler(u).empty for u in range(len(self.targets))):
                raise SlideError(_NO_TISSUE.format(self.foreground))

    def close(self) -> None:
        self.slide.close()
        if self.held is not None:
            self.held.release()


class OpenSlides:
    """At most ``capacity`` open slides, least recently used closed first (no handle leaks)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[Any, SlideEntry] = OrderedDict()

    def get(self, key) -> SlideEntry | None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key, entry: SlideEntry) -> None:
        self.entries[key] = entry
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)[1].close()

    def drop(self, key) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            entry.close()

    def close(self) -> None:
        while self.entries:
            self.entries.popitem()[1].close()

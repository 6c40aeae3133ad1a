"""Online patching: training tiles drawn straight from whole-slide images, as the Midnight models
were trained, with the shard builder's own mask, sampler, reader and HSV filter, so a tile drawn
here at (slide, µm/px, position) is the exact uint8 array `midnight-prep` cuts there before JPEG
encoding (`midnight_prep.job.cut_tile`). Configured by `data.slides` (or `data.datasets` entries
with `slides`), `data.tiles`, `data.slide_pool`, `data.draws_per_slide`, `data.mask_cache_dir`.

One draw (one batch element) of stream s: a dataset by the mixing weights → a slide (uniform over
the dataset's slides, or in proportion to their tissue area with `data.slide_weighting: tissue`,
through the pool below) → a µm/px, uniform over the configured ones the
slide can give without upsampling beyond `mpp_tolerance` → a position uniform over the positions
that pass the foreground test (`midnight_prep.sampling.TissueSampler`) → read → HSV filter. A
rejected candidate is redrawn at the same slide and µm/px (at most MAX_CANDIDATES), then slide
and µm/px are chosen anew. A tile of a dataset whose slides rarely pass is still drawn from that
dataset: the mixing proportions are exact.

Slide pool (locality): opening a slide and computing its tissue mask (a thumbnail read) costs far
more than a tile, so each stream keeps `slide_pool` slides per dataset open and each draw picks
one of them uniformly. Pool slot k holds a slide drawn uniformly from the dataset, replaced every
`slide_pool × draws_per_slide / weight` draws of the stream (staggered over the slots), so a
pool slide gives `draws_per_slide` tiles on average. Every pool member is a uniform draw, so each
tile's slide is still marginally uniform over slides; what the pool changes is correlation: the
tiles of one stream's batch come from about `slide_pool` slides instead of `batch_size`
(batches of other workers and ranks come from other slides). `slide_pool: 1, draws_per_slide: 1`
is the paper's independent draw per element, at the cost of a slide set-up per tile. The set-up
is cheap to repeat with `mask_cache_dir` (masks computed once per node, read back after).

Exact resume: every draw is stateless. Draw i of stream s uses a generator seeded by (seed,
n_streams, s, TAG_DRAW, i); pool slot k at draw i holds the first slide not dropped of a
sequence seeded by (seed, n_streams, s, TAG_POOL, dataset, k, epoch); crop geometry and iBOT
masks of batch b are seeded by b. A stream's position is therefore its counters (draws, batches),
the slides dropped so far (with their reasons) and failed-read counts per slide; caches (open
slides, masks) change speed, never pixels.

Robustness: a slide that cannot be opened, has no µm/px, cannot give any configured µm/px, has
no tissue, keeps failing reads (`midnight_prep.job.MAX_READ_ERRORS`) or gives no tile that passes
the filters in DROP_AFTER_ROUNDS × MAX_CANDIDATES candidates of one draw is dropped from the
stream with one warning naming the file and reason and counted (`slide_error`; failed tile reads
count as `read_error`); when every slide of a dataset is dropped, a RuntimeError names the
dataset and reasons.

For previews, statistics and benchmarks: `tile_sampler(cfg)` gives one stream's `TileSampler`
(`draw()` → `Tile`, `acceptance()` per slide and µm/px, `dropped`); `read_tile` cuts the tile a
key names.
"""


from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from midnight_prep.hsv import hsv_fraction
from midnight_prep.job import Target, cut_tile, tile_target
from midnight_prep.plan import BuildParams
from midnight_prep.sampling import TissueSampler
from midnight_prep.shards import sample_key
from midnight_prep.slides import Slide, SlideError, set_tile_cache_mb
from midnight_prep.staging import SlideCache, StagingError
from midnight_train.data.config import DataConfig, DataError
from midnight_train.data.crops import CropBatch, draw_geometry
from midnight_train.data.open_slides import (
    MaskStore,
    OpenSlides,
    SlideDataset,
    SlideEntry,
    check_slides,
    check_stage_room,
    open_capacity,
    slide_cache,
    slide_datasets,
)
from midnight_train.data.streams import StreamDataset, ibot_masks

log = logging.getLogger(__name__)

TAG_DRAW, TAG_POOL, TAG_GEOMETRY, TAG_MASK = 201, 202, 203, 204
REASONS = ("slide_error", "read_error")
MAX_CANDIDATES = 16  # candidates read at one (slide, µm/px) before slide and µm/px are redrawn
DROP_AFTER_ROUNDS = 8  # rounds of one draw a slide may fail before it is dropped
POSITION_BATCH = 32  # proposals per batch of the position sampler (any value is uniform)


def read_tile(slide: Slide, params: BuildParams, mpp: float, x: int, y: int) -> np.ndarray:
    """The tile (uint8 RGB, before any encoding) the shard builder cuts at ``mpp`` and level-0
    position (x, y) of ``slide``, i.e. the tile a sample key names."""
    target = tile_target(slide, params, mpp)
    if target is None:
        raise SlideError(f"{slide.path} cannot give {mpp:g} µm/px without upsampling")
    return cut_tile(slide, target, *target.from_level0(x, y), params.tile_size)


@dataclass
class Tile:
    """One accepted tile and where it came from (the shard builder's sample JSON fields)."""

    key: str
    rgb: np.ndarray
    dataset: str
    slide_id: str
    source: str
    group: str
    mpp: float
    x: int
    y: int
    level: int
    read_size: int
    extent: float
    tile_size: int
    foreground: float
    hsv_fraction: float

    def meta(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("key", "rgb", "dataset")}


# ---------------------------------------------------------------------------- the sampler


class TileSampler:
    """One stream's endless sequence of accepted tiles (see the module docstring). ``seed`` is
    the stream's seed words, e.g. [seed, n_streams, stream]; ``state`` a `state()` to continue
    from. Close it (or use it as a context manager) to close its slides."""

    def __init__(self, datasets: list[SlideDataset], params: BuildParams, *, seed: list[int],
                 slide_pool: int = 16, draws_per_slide: int = 64, mask_cache_dir: str | None = None,
                 stage: SlideCache | None = None, weighting: str = "uniform",
                 tissue_cap: float = 1000.0, state: dict[str, Any] | None = None) -> None:
        self.datasets, self.params, self.seed = datasets, params, list(seed)
        self.pool = slide_pool
        self.weighting, self.tissue_cap = weighting, float(tissue_cap)
        self.areas: dict[tuple[int, str], float] = {}  # (dataset, slide_id) -> tissue mm², capped
        self._memo: dict[tuple[int, int], tuple[int, int]] = {}  # (dataset, slot) -> (epoch, slide)
        weights = np.array([d.weight for d in datasets], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.periods = [max(1, round(slide_pool * draws_per_slide / w)) for w in self.weights]
        self.open = OpenSlides(open_capacity(slide_pool, len(datasets)))
        self.masks = MaskStore(mask_cache_dir)
        self.stage = stage or SlideCache()
        self.draws = 0
        self.dropped: dict[tuple[int, str], str] = {}  # (dataset, slide_id) -> reason
        self.read_errors: dict[tuple[int, str], int] = {}
        self.counts = {r: 0 for r in REASONS}
        # (dataset name, slide_id, µm/px) -> accepted / foreground / hsv / read_error; in
        # memory only (statistics, not position)
        self.stats: dict[tuple[str, str, float], dict[str, int]] = {}
        if state is not None:
            self.draws = int(state["draws"])
            self.dropped = {(int(d), str(s)): str(r) for d, s, r in state["dropped"]}
            self.read_errors = {(int(d), str(s)): int(n) for d, s, n in state["read_errors"]}
            self.counts.update({k: int(v) for k, v in state["counters"].items()})

    def __enter__(self) -> TileSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.open.close()

    def state(self) -> dict[str, Any]:
        return {"draws": self.draws,
                "dropped": [[d, s, r] for (d, s), r in sorted(self.dropped.items())],
                "read_errors": [[d, s, n] for (d, s), n in sorted(self.read_errors.items())],
                "counters": dict(self.counts)}

    def acceptance(self) -> list[dict[str, Any]]:
        """Per dataset, slide and µm/px: tiles accepted, proposals below the foreground
        threshold, candidates rejected by the HSV filter, failed reads, and the acceptance
        rate of the candidates read."""
        rows = []
        for (name, slide_id, mpp), c in sorted(self.stats.items()):
            read = c["accepted"] + c["hsv"] + c["read_error"]
            rows.append({"dataset": name, "slide_id": slide_id, "mpp": mpp, **c,
                         "accept_rate": round(c["accepted"] / read, 4) if read else None})
        return rows

    # -- pool and slides

    def _pool_slide(self, d: int, k: int, i: int) -> int:
        """The slide in pool slot k of dataset d at draw i: a pure function of the seed, the
        slot, its epoch, the slides dropped so far (and, weighted by tissue, the slides' tissue
        areas). Candidate t of a slot's epoch is drawn by its own generator, so candidates
        skipped as dropped do not shift the others."""
        period = self.periods[d]
        epoch = (i + k * period // self.pool) // period
        memo = self._memo.get((d, k))
        if memo is not None and memo[0] == epoch:
            return memo[1]
        while True:
            # Weighted by tissue, choosing opens candidates and may drop some, which changes the
            # choice (the every-64th-try fallback): choose again until no slide drops, so the
            # slot is what the dropped set gives, as a resumed run computes it.
            dropped = len(self.dropped)
            j = self._choose_slide(d, k, epoch)
            if len(self.dropped) == dropped:
                break
        self._memo[(d, k)] = (epoch, j)
        return j

    def _choose_slide(self, d: int, k: int, epoch: int) -> int:
        ds = self.datasets[d]
        for t in itertools.count():
            rng = np.random.default_rng(self.seed + [TAG_POOL, d, k, epoch, t])
            j, u = int(rng.integers(len(ds.slides))), rng.random()
            if (d, ds.slides[j].slide_id) in self.dropped:
                if t >= 64 and t % 64 == 0:  # many dropped: uniform over the slides left
                    alive = [a for a, s in enumerate(ds.slides) if (d, s.slide_id) not in self.dropped]
                    if not alive:
                        reasons = [f"{s.path}: {self.dropped[(d, s.slide_id)]}" for s in ds.slides[:3]]
                        raise DataError(f"dataset {ds.name!r}: all {len(ds.slides)} slides were "
                                           f"dropped as unusable, e.g. {'; '.join(reasons)}")
                    j = alive[int(rng.integers(len(alive)))]
                else:
                    continue
            # Weighted by tissue: accept with probability area / cap (rejection sampling), so a
            # slot holds slide j with probability proportional to its tissue area.
            if self.weighting == "uniform" or u * self.tissue_cap < self._tissue_mm2(d, j):
                break
        return j

    def _tissue_mm2(self, d: int, j: int) -> float:
        """Slide j's tissue area (mm², at most the cap), known once it has been opened; 0 for a
        slide that fails to open (it is dropped)."""
        sid = self.datasets[d].slides[j].slide_id
        if (d, sid) not in self.areas:
            entry = self._open(d, j)
            area = 0.0 if entry is None else entry.tissue_mm2
            if area > self.tissue_cap:
                log.warning("slide %s has %.0f mm² of tissue, above data.tissue_mm2_cap (%g): "
                            "weighted as if it had %g", self.datasets[d].slides[j].path, area,
                            self.tissue_cap, self.tissue_cap)
            self.areas[(d, sid)] = min(area, self.tissue_cap)
        return self.areas[(d, sid)]

    def _drop(self, d: int, j: int, reason: str) -> None:
        spec = self.datasets[d].slides[j]
        self.dropped[(d, spec.slide_id)] = reason[:300]
        self.counts["slide_error"] += 1
        self.open.drop((d, j))
        self._memo.clear()  # slots are a function of the dropped slides
        log.warning("dropped slide %s (dataset %r): %s", spec.path, self.datasets[d].name, reason)

    def _open(self, d: int, j: int) -> SlideEntry | None:
        """Slide j of dataset d, opened (or still open); None when it fails and is dropped."""
        entry = self.open.get((d, j))
        if entry is not None:
            return entry
        spec = self.datasets[d].slides[j]
        try:
            entry = SlideEntry(spec, self.params, self.masks,
                               self.read_errors.get((d, spec.slide_id), 0), self.stage)
        except StagingError as err:
            if not isinstance(err.__cause__, FileNotFoundError):
                raise  # storage down past data.read_retry_s: stop (resume continues exactly)
            self._drop(d, j, str(err))
            return None
        except Exception as err:  # noqa: BLE001 - one slide's failure never ends the run
            self._drop(d, j, str(err) if isinstance(err, SlideError) else f"{type(err).__name__}: {err}")
            return None
        self.open.put((d, j), entry)
        return entry

    def _slot(self, d: int, k: int, i: int) -> tuple[int, SlideEntry]:
        while True:  # each failure drops a slide, so this ends (or raises: all dropped)
            j = self._pool_slide(d, k, i)
            entry = self._open(d, j)
            if entry is not None:
                return j, entry

    # -- draws

    def draw(self) -> Tile:
        """The next accepted tile of the stream."""
        i = self.draws
        rng = np.random.default_rng(self.seed + [TAG_DRAW, i])
        d = int(rng.choice(len(self.datasets), p=self.weights)) if len(self.datasets) > 1 else 0
        failed: dict[int, int] = {}
        while True:  # every failed round counts against a slide, which is dropped in the end
            k = int(rng.integers(self.pool))
            j, entry = self._slot(d, k, i)
            try:
                target, sampler = entry.choose(rng)
                tile = self._candidates(d, j, entry, target, sampler, rng)
            except SlideError as err:  # no tissue, or MAX_READ_ERRORS reached
                self._drop(d, j, str(err))
                continue
            if tile is not None:
                self.draws += 1
                return tile
            failed[j] = failed.get(j, 0) + 1
            if failed[j] >= DROP_AFTER_ROUNDS:
                self._drop(d, j, f"no tile passed the filters in {DROP_AFTER_ROUNDS * MAX_CANDIDATES} "
                                 f"candidates (HSV: >= {self.params.hsv_min_fraction:.0%} of pixels "
                                 f"in range)")

    def _candidates(self, d: int, j: int, entry: SlideEntry, target: Target,
                    sampler: TissueSampler, rng: np.random.Generator) -> Tile | None:
        """Up to MAX_CANDIDATES positions at (slide, µm/px): the first that reads and passes
        the HSV filter, or None."""
        ds, spec, params = self.datasets[d], self.datasets[d].slides[j], self.params
        stats = self.stats.setdefault((ds.name, spec.slide_id, target.mpp),
                                      {"accepted": 0, "foreground": 0, "hsv": 0, "read_error": 0})
        positions = sampler.positions(rng, rejected=stats, batch=POSITION_BATCH)
        for n, (x0, y0, frac) in enumerate(positions):
            if n == MAX_CANDIDATES:
                break
            xl, yl = target.corner(x0, y0)
            try:
                rgb = entry.reader.tile(target, xl, yl)
            finally:
                if entry.reader.errors:
                    self.read_errors[(d, spec.slide_id)] = entry.reader.errors
            if isinstance(rgb, SlideError):
                stats["read_error"] += 1
                self.counts["read_error"] += 1
                continue
            hf = hsv_fraction(rgb)
            if hf < params.hsv_min_fraction:
                stats["hsv"] += 1
                continue
            stats["accepted"] += 1
            x, y = target.level0(xl, yl)
            return Tile(sample_key(spec.slide_id, target.mpp, x, y), rgb, ds.name, spec.slide_id,
                        spec.path, spec.group, target.mpp, x, y, target.level.index,
                        target.read_size, round(target.read_size * target.level.downsample, 3),
                        params.tile_size, round(frac, 4), round(hf, 4))
        return None


def tile_sampler(cfg: DataConfig, *, seed: int = 0, stream: int = 0, n_streams: int = 1,
                 state: dict[str, Any] | None = None) -> TileSampler:
    """Stream ``stream`` of ``n_streams``' tile sampler of a slide source, outside the
    DataLoader (previews, acceptance statistics, benchmarks). The training loader's stream s of
    S draws the same tiles with ``seed`` = its stream seed."""
    datasets = slide_datasets(cfg)
    return TileSampler(datasets, cfg.tile_params(), seed=[int(seed) & 0xFFFFFFFF, n_streams, stream],
                       slide_pool=cfg.slide_pool, draws_per_slide=cfg.draws_per_slide,
                       mask_cache_dir=cfg.mask_cache_dir, stage=slide_cache(cfg),
                       weighting=cfg.slide_weighting, tissue_cap=cfg.tissue_mm2_cap, state=state)


# ---------------------------------------------------------------------------- batches


class SlideStream:
    """One logical worker's endless batches from slides (runs inside a DataLoader worker)."""

    def __init__(self, cfg: DataConfig, datasets: list[SlideDataset], *, seed: int, stream: int,
                 n_streams: int, worker: int, position: dict[str, Any] | None = None) -> None:
        self.cfg, self.worker = cfg, worker
        self.seed = [int(seed) & 0xFFFFFFFF, n_streams, stream]
        self.sampler = TileSampler(datasets, cfg.tile_params(), seed=self.seed,
                                   slide_pool=cfg.slide_pool, draws_per_slide=cfg.draws_per_slide,
                                   mask_cache_dir=cfg.mask_cache_dir, stage=slide_cache(cfg),
                                   weighting=cfg.slide_weighting, tissue_cap=cfg.tissue_mm2_cap,
                                   state=position)
        self.batches = int(position["batches"]) if position else 0

    def position(self) -> dict[str, Any]:
        return {"worker": self.worker, "batches": self.batches, **self.sampler.state()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        try:
            while True:
                geometry = draw_geometry(np.random.default_rng(self.seed + [TAG_GEOMETRY, self.batches]),
                                         cfg.batch_size, cfg)
                batch = CropBatch(cfg.batch_size, cfg)
                for row in range(cfg.batch_size):
                    tile = self.sampler.draw()
                    batch.add(tile.key, Image.fromarray(tile.rgb), geometry, row)
                masks = ibot_masks(cfg, np.random.default_rng(self.seed + [TAG_MASK, self.batches]))
                self.batches += 1
                yield {**batch.tensors(), **masks, "_position": self.position()}
        finally:
            self.sampler.close()


class SlideStreamDataset(StreamDataset):
    """Streams of online-patched slides; the slide lists are read and checked at construction,
    so a wrong path fails before training starts."""

    reasons = REASONS

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, world_size: int) -> None:
        super().__init__(cfg, seed=seed, rank=rank, world_size=world_size)
        self.datasets = slide_datasets(cfg)
        # Its held slides are released before the DataLoader forks (no inherited locks).
        cache = slide_cache(cfg)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun, accelerate launch
        check_stage_room(cfg, self.datasets, cache, max(1, cfg.num_workers) * local)
        check_slides(self.datasets, cache)

    def make_stream(self, *, stream: int, n_streams: int, worker: int,
                    position: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        set_tile_cache_mb(self.cfg.tile_cache_mb)  # in the worker: one budget per process
        return iter(SlideStream(self.cfg, self.datasets, seed=self.seed, stream=stream,
                                n_streams=n_streams, worker=worker, position=position))

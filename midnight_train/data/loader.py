"""Training input: webdataset shards (or whole-slide images, online) → DINOv2 multi-crop batches
with an exact, resumable position.

Contract (what the trainer relies on)
-------------------------------------
`make_loader(cfg, seed=, rank=, world_size=, state=None)` returns a `Loader`:
- iterating it yields batches forever; each batch is a dict of CPU tensors:
  `global_crops` uint8 [2, B, 3, G, G], `local_crops` uint8 [n_local, B, 3, L, L] (channels-last
  memory: views of [2, B, G, G, 3] / [n_local, B, L, L, 3] buffers, as each crop leaves PIL in HWC
  order; `ColorAugment` makes them contiguous on the device),
  `masks` bool [2·B, (G // patch_size)²] in crop-major order (all samples' crop 0, then all
  samples' crop 1), i.e. row i belongs to `global_crops.flatten(0, 1)[i]`, and `keys` list[str].
  Colour/HED augmentation and normalisation happen later, batched on the model's device
  (`midnight_train.method.augment.ColorAugment`); the CPU workers only decode and do geometry.
- `state_dict()` is a JSON-serialisable position after the batches handed out so far;
  `make_loader(..., state=that)` continues with exactly the batches an uninterrupted run would
  have produced next (same seed, rank, world size and num_workers; otherwise the loader warns
  and starts a fresh order derived from the seed and the number of batches already consumed, so
  it does not replay the old order).
- `iter(loader)` starts the workers at once, never draws from the global torch/numpy/random
  generators, and a new `iter()` continues from the current position (one iterator at a time).
- `counters()` gives skipped-sample counts by reason (`decode_error`, `malformed`, `shard_error`,
  `shard_truncated`; for slides `slide_error`, `read_error`), summed over workers as of the
  batches consumed so far.

Sources
-------
`DataConfig.shards` (one dataset) or `DataConfig.datasets` (a list of
`{"shards": ..., "weight": 1.0, "group": None, "name": None}` mixed with probabilities
proportional to `weight`); each is a shard source as `midnight_train.data.sources` reads it. `group`
keeps only samples whose JSON `group` field equals it (e.g. two datasets from one shard set).

`DataConfig.slides` (or datasets with `slides` instead of `shards`; the two kinds are not mixed
in one run) trains from whole-slide images by online patching: `midnight_train.data.slide_source`,
with the tile parameters `tiles` (midnight-prep's), `slide_pool`, `draws_per_slide` and
`mask_cache_dir`. Its streams follow the same contract (batches, positions, worker rotation)
with every draw seeded by its index; its module docstring says how. The rest of this docstring
is about shards.

How the stream is built (and why resume is exact)
-------------------------------------------------
Each DataLoader worker of each rank is one *stream* s = rank · num_workers + worker out of
S = world_size · num_workers. Per dataset, stream s owns shards[s::S]; when a dataset has fewer
shards than streams, each shard is shared by the streams s ≡ i (mod n) and each of them takes
every k-th sample of it (disjoint samples, no duplicates). A stream reads its shards endlessly in
per-epoch permutations seeded by (seed, s, epoch), with `shard_interleave` shards open at once.
Records are pulled in blocks of `shuffle_buffer`: for block b the dataset of each record
(weights), the open shard it comes from, the permutation of the block and all crop geometry
are drawn from generators seeded by (seed, s, b), before any JPEG is decoded. A worker's position
is therefore (block b, the per-shard read counts at the start of b, offset in b, batches made):
resuming re-reads at most one block of raw records (no decoding) and continues bit-identically.
Workers produce whole batches; the DataLoader hands them out round-robin, so the loader records
which logical worker must deliver next and rotates worker ids on resume.

Robustness: damaged shards and samples are skipped and counted (`midnight_train.data.records`), and
so is an undecodable or truncated JPEG (`decode_error`). A stream that finds no readable sample
in two passes over its shards raises a clear error instead of spinning; the DataLoader
`timeout_s` turns a stalled read into an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from midnight_prep.plan import BuildParams, PlanError
from midnight_train.data.crops import CropBatch, decode_tile, draw_geometry
from midnight_train.data.masking import batch_masks
from midnight_train.data.records import REASONS, SkipCounts, shard_records
from midnight_train.data.sources import assign_shards, check_reachable, shard_counts

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Seed tags: independent generator families derived from the same (seed, stream, index).
_TAG_EPOCH, _TAG_PULL, _TAG_GEOMETRY, _TAG_MASK = 101, 102, 103, 104
# The keys of `data.tiles` (the rest of BuildParams is about writing shards).
TILE_KEYS = ("mpps", "tile_size", "foreground", "hsv_min_fraction", "mpp_tolerance")


@dataclass
class DataConfig:
    """The `data:` section of the training config (plain YAML types; lists work for pairs)."""

    shards: str | list[str] | None = None
    # online patching (midnight_train.data.slide_source): slides, directories or CSV slide lists,
    # exactly the inputs midnight-prep accepts
    slides: str | list[str] | None = None
    datasets: list[dict[str, Any]] | None = None
    # slide sources: mpps, tile_size, foreground, hsv_min_fraction, mpp_tolerance, checked and
    # defaulted as midnight-prep's (midnight_prep.plan.BuildParams)
    tiles: dict[str, Any] | None = None
    slide_pool: int = 16  # slides a stream draws from at once (per dataset)
    draws_per_slide: int = 64  # tiles drawn from a pool slide, on average, before it is replaced
    # "uniform" over a dataset's slides, or "tissue": in proportion to each slide's tissue area
    # (areas above tissue_mm2_cap count as the cap; a lower cap opens fewer slides to choose one)
    slide_weighting: str = "uniform"
    tissue_mm2_cap: float = 1000.0
    mask_cache_dir: str | None = None  # tissue masks kept on disk, shared by a node's workers
    # s3:// (remote) slides are staged here for OpenSlide; the limit must hold every slide open
    # at once: processes x num_workers x slide_pool x datasets x the largest slide
    stage_dir: str | None = None
    stage_max_gb: float | None = None  # default: 50 GB or half the free disk, if less
    batch_size: int = 64  # per process
    num_workers: int = 4
    shuffle_buffer: int = 1000  # records shuffled together (one block); memory ≈ this × JPEG size
    shard_interleave: int = 4  # shards a stream reads from at once
    prefetch_factor: int = 2
    timeout_s: float = 600.0  # a worker silent for this long is an error, not a hang
    # storage down this long stops the run; below timeout_s (default: half of it)
    read_retry_s: float | None = None
    global_crop_size: int = 224
    global_crop_scale: tuple[float, float] | list[float] = (0.32, 1.0)
    n_local_crops: int = 8
    local_crop_size: int = 98
    local_crop_scale: tuple[float, float] | list[float] = (0.05, 0.32)
    crop_ratio: tuple[float, float] | list[float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip_rot90: bool = False  # all 8 flips/rotations (pathology has no canonical orientation)
    patch_size: int = 14
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] | list[float] = (0.1, 0.5)
    mask_max_fraction: float = 0.5
    mask_min_patches: int = 4

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.shards, self.slides, self.datasets)) != 1:
            raise ValueError("data: give exactly one of `shards`, `slides` or `datasets`")
        for name in ("global_crop_scale", "local_crop_scale", "crop_ratio", "mask_ratio_min_max"):
            pair = getattr(self, name)
            if len(pair) != 2 or not pair[0] <= pair[1]:
                raise ValueError(f"data.{name} must be [low, high], got {pair!r}")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data: batch_size ≥ 1, num_workers ≥ 0 and shuffle_buffer ≥ 1 required")
        if self.read_retry_s is None:
            self.read_retry_s = self.timeout_s / 2
        if not 0 <= self.read_retry_s < self.timeout_s:
            raise ValueError(f"data.read_retry_s ({self.read_retry_s:g}) must be ≥ 0 and below "
                             f"data.timeout_s ({self.timeout_s:g}), or a worker waiting for "
                             f"storage is taken for a hung one")
        kinds = set()
        for spec in self.dataset_specs():
            unknown = set(spec) - {"shards", "slides", "weight", "group", "name"}
            kind = [k for k in ("shards", "slides") if spec.get(k) is not None]
            if unknown or len(kind) != 1 or float(spec.get("weight", 1.0)) <= 0:
                raise ValueError(f"data.datasets entry {spec!r}: needs one of `shards` or "
                                 f"`slides`, a weight > 0, and only shards/slides/weight/group/name")
            kinds.update(kind)
        if len(kinds) > 1:
            raise ValueError("data.datasets: shard and slide datasets cannot be mixed in one run; "
                             "build shards of the slides (midnight-prep) or use slides for all")
        if self.source_kind() == "slides":
            self.tile_params()
            if self.slide_pool < 1 or self.draws_per_slide < 1:
                raise ValueError("data: slide_pool and draws_per_slide must be >= 1")
            if self.slide_weighting not in ("uniform", "tissue") or not self.tissue_mm2_cap > 0:
                raise ValueError(f"data.slide_weighting must be uniform or tissue (got "
                                 f"{self.slide_weighting!r}) and data.tissue_mm2_cap > 0")
            if self.stage_max_gb is not None and not self.stage_max_gb > 0:
                raise ValueError(f"data.stage_max_gb must be > 0, got {self.stage_max_gb!r}")
        elif self.tiles is not None:
            raise ValueError("data.tiles applies to slide sources (data.slides) only: shards "
                             "carry the tiles they were built with")

    def dataset_specs(self) -> list[dict[str, Any]]:
        if self.datasets is None:
            kind = "shards" if self.shards is not None else "slides"
            return [{kind: getattr(self, kind), "weight": 1.0, "group": None, "name": "default"}]
        return [dict(d) for d in self.datasets]

    def source_kind(self) -> str:
        """"shards" or "slides" (online patching)."""
        return "slides" if any(s.get("slides") is not None for s in self.dataset_specs()) else "shards"

    def tile_params(self) -> BuildParams:
        """The tile parameters of a slide source, validated and defaulted by midnight-prep's
        own rules (the same tiles as the shard builder's)."""
        if not isinstance(self.tiles, (dict, type(None))):
            raise ValueError(f"data.tiles must be a mapping such as {{tile_size: 256}}, got {self.tiles!r}")
        tiles = dict(self.tiles or {})
        unknown = sorted(set(tiles) - set(TILE_KEYS))
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join('data.tiles.' + k for k in unknown)}; "
                             f"known keys in data.tiles: {', '.join(TILE_KEYS)}")
        if "mpps" in tiles:
            mpps = tiles["mpps"] if isinstance(tiles["mpps"], (list, tuple)) else [tiles["mpps"]]
            tiles["mpps"] = tuple(float(m) if type(m) is int else m for m in mpps)
        try:
            return BuildParams(**tiles)
        except PlanError as err:  # the builder names its command-line options
            message = str(err)
            for option, key in (("--mpp", "mpps"), ("--tile-size", "tile_size"),
                                ("--foreground", "foreground"),
                                ("--hsv-min-fraction", "hsv_min_fraction"), (" (plan.json)", "")):
                message = message.replace(option, key)
            raise ValueError(f"data.tiles: {message}") from None


class DataError(RuntimeError):
    """The data cannot give batches (no readable sample, every slide unusable): one line for
    the user. Raised in a DataLoader worker, torch re-raises it with that worker's traceback."""


def ibot_masks(cfg: DataConfig, rng: np.random.Generator) -> torch.Tensor:
    """The iBOT masks of one batch's global crops, [2·B, (G // patch)²], crop-major."""
    return torch.from_numpy(batch_masks(
        rng, 2 * cfg.batch_size, cfg.global_crop_size // cfg.patch_size,
        sample_probability=cfg.mask_sample_probability, ratio_min_max=tuple(cfg.mask_ratio_min_max),
        max_fraction=cfg.mask_max_fraction, min_patches=cfg.mask_min_patches))


class _DatasetReader:
    """One dataset's shards for one stream: endless per-epoch permutations, interleaved slots."""

    def __init__(self, index: int, name: str, assigned: list[tuple[str, int, int]], group: str | None,
                 seed: list[int], interleave: int, counts: SkipCounts, retry_s: float) -> None:
        self.index, self.name, self.assigned, self.group = index, name, assigned, group
        self.retry_s = retry_s
        self.seed, self.counts = seed, counts
        self.n_slots = max(1, min(interleave, len(assigned)))
        self.next_pick = 0
        self.slots: list[list[Any]] = []  # [pick, records read, iterator]
        self._perm: tuple[int, np.ndarray] | None = None
        self._dry = 0  # picks in a row that gave no record

    def _open(self, pick: int) -> list[Any]:
        epoch, i = divmod(pick, len(self.assigned))
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng(self.seed + [_TAG_EPOCH, self.index, epoch])
            self._perm = (epoch, rng.permutation(len(self.assigned)))
        url, stride, offset = self.assigned[int(self._perm[1][i])]
        return [pick, 0, shard_records(url, self.counts, stride=stride, offset=offset,
                                      group=self.group, retry_s=self.retry_s)]

    def start(self) -> None:
        self.slots = [self._open(p) for p in range(self.n_slots)]
        self.next_pick = self.n_slots

    def state(self) -> dict[str, Any]:
        return {"next_pick": self.next_pick, "slots": [[s[0], s[1]] for s in self.slots]}

    def restore(self, state: dict[str, Any]) -> None:
        self.next_pick = int(state["next_pick"])
        self.slots = []
        for pick, read in state["slots"]:
            slot = self._open(int(pick))
            for _ in range(int(read)):  # skip without decoding
                if next(slot[2], None) is None:
                    break
            slot[1] = int(read)
            self.slots.append(slot)

    def next(self, rng: np.random.Generator) -> dict[str, Any]:
        k = int(rng.integers(self.n_slots))
        while True:
            slot = self.slots[k]
            record = next(slot[2], None)
            if record is not None:
                slot[1] += 1
                self._dry = 0
                return record
            self._dry = self._dry + 1 if slot[1] == 0 else 0
            if self._dry > 2 * len(self.assigned) + self.n_slots:
                raise DataError(
                    f"dataset {self.name!r}: no readable samples in {len(self.assigned)} shard(s) "
                    f"assigned to this stream (e.g. {self.assigned[0][0]}); skip counts: "
                    f"{self.counts.counts}")
            self.slots[k] = self._open(self.next_pick)
            self.next_pick += 1


# ---------------------------------------------------------------------------- the stream


class SampleStream:
    """One logical worker's endless stream of batches (runs inside a DataLoader worker)."""

    def __init__(self, cfg: DataConfig, shard_lists: list[list[str]], *, seed: int, stream: int,
                 n_streams: int, worker: int, position: dict[str, Any] | None = None) -> None:
        self.cfg, self.worker = cfg, worker
        self.seed = [int(seed) & 0xFFFFFFFF, n_streams, stream]
        self.counts = SkipCounts()
        self.tile_size: tuple[int, int] | None = None  # the first tile's, to warn about a mix
        specs = cfg.dataset_specs()
        self.weights = np.array([float(s.get("weight", 1.0)) for s in specs])
        self.weights /= self.weights.sum()
        self.readers = [
            _DatasetReader(i, str(s.get("name") or f"dataset{i}"),
                           assign_shards(urls, stream, n_streams), s.get("group"),
                           self.seed, cfg.shard_interleave, self.counts, cfg.read_retry_s)
            for i, (s, urls) in enumerate(zip(specs, shard_lists, strict=True))
        ]
        self.block, self.offset, self.batches = 0, 0, 0
        if position is None:
            for r in self.readers:
                r.start()
            self._pull_block()
        else:
            for r, st in zip(self.readers, position["readers"], strict=True):
                r.restore(st)
            self.block, self.batches = int(position["block"]), int(position["batches"])
            self._pull_block()
            self.offset = int(position["offset"])
            self.counts.counts.update(position["counters"])  # restore ran silently counted

    def _pull_block(self) -> None:
        n = self.cfg.shuffle_buffer
        self.block_start = [r.state() for r in self.readers]
        rng = np.random.default_rng(self.seed + [_TAG_PULL, self.block])
        which = rng.choice(len(self.readers), size=n, p=self.weights)
        records = [self.readers[int(d)].next(rng) for d in which]
        self.records = [records[i] for i in rng.permutation(n)]
        self.geometry = draw_geometry(np.random.default_rng(self.seed + [_TAG_GEOMETRY, self.block]), n, self.cfg)

    def position(self) -> dict[str, Any]:
        return {"worker": self.worker, "block": self.block, "offset": self.offset,
                "batches": self.batches, "readers": self.block_start, "counters": dict(self.counts.counts)}

    def _check_tile_size(self, record: dict[str, Any], size: tuple[int, int]) -> None:
        if self.tile_size is None:
            self.tile_size = size
        elif size != self.tile_size:  # crops are fractions of the tile: the field of view differs
            log.warning("tiles of different sizes in one stream (%s is %dx%d, earlier ones %dx%d): "
                        "crops cover the same fraction of each tile, so their fields of view "
                        "differ; build the shards with one --tile-size", record["__key__"],
                        *size, *self.tile_size)
            self.tile_size = size

    def _next_image(self) -> tuple[dict[str, Any], Any, int]:
        """The next decodable record of the shuffled blocks, its image and its geometry row."""
        bad_run = 0
        while True:
            if self.offset == len(self.records):
                self.block += 1
                self._pull_block()
                self.offset = 0
            i = self.offset
            self.offset += 1
            record = self.records[i]
            try:
                return record, decode_tile(record["jpg"]), i
            except Exception as exn:
                self.counts.skip("decode_error", f"{record['__url__']}: {record['__key__']}: {exn!r}")
                bad_run += 1
                if bad_run > 10 * self.cfg.shuffle_buffer + 1000:
                    raise DataError(f"{bad_run} undecodable samples in a row: the shards hold "
                                       f"no usable JPEG tiles ({self.counts.counts})") from exn

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        while True:
            batch = CropBatch(cfg.batch_size, cfg)
            while not batch.full():
                record, img, i = self._next_image()
                self._check_tile_size(record, img.size)
                batch.add(record["__key__"], img, self.geometry, i)
            masks = ibot_masks(cfg, np.random.default_rng(self.seed + [_TAG_MASK, self.batches]))
            self.batches += 1
            yield {**batch.tensors(), "masks": masks, "_position": self.position()}


class StreamDataset(IterableDataset):
    """The DataLoader-facing dataset: maps each worker to its logical stream and start position
    (`Loader` sets `positions` and `rotation`); subclasses make the stream."""

    reasons: tuple[str, ...] = REASONS  # the skip counters its positions carry

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, world_size: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.rank, self.world_size = rank, world_size
        self.n_workers = max(1, cfg.num_workers)
        self.positions: list[dict[str, Any] | None] = [None] * self.n_workers
        self.rotation = 0

    def make_stream(self, *, stream: int, n_streams: int, worker: int,
                    position: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.n_workers
        return iter(self.make_stream(stream=self.rank * self.n_workers + worker,
                                     n_streams=self.world_size * self.n_workers, worker=worker,
                                     position=self.positions[worker]))


class ShardStreamDataset(StreamDataset):
    """Streams of webdataset shards (`SampleStream`)."""

    def __init__(self, cfg: DataConfig, shard_lists: list[list[str]], *, seed: int, rank: int,
                 world_size: int) -> None:
        super().__init__(cfg, seed=seed, rank=rank, world_size=world_size)
        self.shard_lists = shard_lists

    def make_stream(self, *, stream: int, n_streams: int, worker: int,
                    position: dict[str, Any] | None) -> Iterator[dict[str, Any]]:
        return iter(SampleStream(self.cfg, self.shard_lists, seed=self.seed, stream=stream,
                                 n_streams=n_streams, worker=worker, position=position))


class Loader:
    """Endless batches with a resumable position; see the module docstring for the contract."""

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                 state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.identity = {"seed": int(seed), "rank": int(rank), "world_size": int(world_size),
                         "num_workers": int(cfg.num_workers)}
        self.source = cfg.source_kind()
        self.consumed = 0
        stream_seed = int(seed)
        n_workers = max(1, cfg.num_workers)
        positions: list[dict[str, Any] | None] = [None] * n_workers
        if state is not None:
            self.consumed = int(state["batches"])
            same = ({k: state.get(k) for k in self.identity} == self.identity
                    and state.get("source", "shards") == self.source)
            if same and state.get("version") == STATE_VERSION:
                stream_seed = int(state["stream_seed"])
                positions = list(state["workers"])
            else:
                # An exact continuation is impossible; at least do not replay the same order.
                stream_seed = int(np.random.default_rng([int(seed), self.consumed]).integers(2**31))
                log.warning("data state from %s does not match %s: starting a fresh order (seed %d)",
                            {k: state.get(k) for k in self.identity}, self.identity, stream_seed)
        self.stream_seed = stream_seed
        self.positions = positions
        if self.source == "slides":
            from midnight_train.data.slide_source import SlideStreamDataset

            self.dataset: StreamDataset = SlideStreamDataset(cfg, seed=stream_seed, rank=rank,
                                                             world_size=world_size)
            return
        shard_lists = []
        for spec in cfg.dataset_specs():
            listed = shard_counts(spec["shards"])
            shard_lists.append([url for url, _ in listed])
            if listed:
                check_reachable(listed[0][0])
            known = [n for _, n in listed if n is not None]
            if len(known) == len(listed) and sum(known) < cfg.batch_size * world_size:
                log.warning("dataset %r has %d samples, fewer than one global batch (%d × %d "
                            "processes): every batch repeats tiles", spec.get("name"),
                            sum(known), cfg.batch_size, world_size)
        self.dataset = ShardStreamDataset(cfg, shard_lists, seed=stream_seed, rank=rank,
                                          world_size=world_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n_workers = max(1, self.cfg.num_workers)
        self.dataset.positions = list(self.positions)
        self.dataset.rotation = self.consumed % n_workers  # this worker delivers the next batch
        extra = {}
        if self.cfg.num_workers > 0:
            extra = {"prefetch_factor": self.cfg.prefetch_factor, "timeout": self.cfg.timeout_s}
        # A private generator: the DataLoader's base-seed draw must not touch the global torch
        # RNG (the trainer restores that on resume and needs it to stay in step).
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.cfg.num_workers,
                            generator=torch.Generator().manual_seed(self.stream_seed), **extra)
        return self._hand_out(iter(loader))  # workers start now, not at the first next()

    def _hand_out(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        try:
            for batch in batches:
                position = batch.pop("_position")
                self.positions[position["worker"]] = position
                self.consumed += 1
                yield batch
        finally:  # workers block SIGTERM: stop them here, also when one has failed
            getattr(batches, "_shutdown_workers", lambda: None)()

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self.identity, "source": self.source,
                "stream_seed": self.stream_seed,
                "batches": self.consumed, "workers": json.loads(json.dumps(self.positions))}

    def counters(self) -> dict[str, int]:
        total = {r: 0 for r in self.dataset.reasons}
        for p in self.positions:
            for reason, n in (p or {}).get("counters", {}).items():
                total[reason] = total.get(reason, 0) + int(n)
        return total


def make_loader(cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                state: dict[str, Any] | None = None) -> Loader:
    """The training loader for this rank (see the module docstring for the contract)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return Loader(cfg, seed=seed, rank=rank, world_size=world_size, state=state)


__all__ = ["DataConfig", "Loader", "make_loader"]

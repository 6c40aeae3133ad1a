"""Shard streams: each DataLoader worker's endless batches of webdataset shards.

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

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from midnight_train.data.config import DataConfig, DataError
from midnight_train.data.crops import CropBatch, decode_tile, draw_geometry
from midnight_train.data.records import SkipCounts, shard_records
from midnight_train.data.sources import assign_shards
from midnight_train.data.streams import StreamDataset, ibot_masks

log = logging.getLogger(__name__)

# Seed tags: independent generator families derived from the same (seed, stream, index).
_TAG_EPOCH, _TAG_PULL, _TAG_GEOMETRY, _TAG_MASK = 101, 102, 103, 104


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
            yield {**batch.tensors(), **masks, "_position": self.position()}


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

"""Training input: webdataset shards → DINOv2 multi-crop batches with an exact, resumable position.

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
  (`midnight_train.augment.ColorAugment`); the CPU workers only decode and do geometry.
- `state_dict()` is a JSON-serialisable position after the batches handed out so far;
  `make_loader(..., state=that)` continues with exactly the batches an uninterrupted run would
  have produced next (same seed, rank, world size and num_workers; otherwise the loader warns
  and starts a fresh order derived from the seed and the number of batches already consumed, so
  it does not replay the old order).
- `iter(loader)` starts the workers at once, never draws from the global torch/numpy/random
  generators, and a new `iter()` continues from the current position (one iterator at a time).
- `counters()` gives skipped-sample counts by reason (`decode_error`, `malformed`, `shard_error`,
  `shard_truncated`), summed over workers as of the batches consumed so far.

Sources
-------
`DataConfig.shards` (one dataset) or `DataConfig.datasets` (a list of
`{"shards": ..., "weight": 1.0, "group": None, "name": None}` mixed with probabilities
proportional to `weight`). A shard source is a list of sources, a brace pattern
(`train-{000000..000999}.tar`), a single `.tar`, a glob, a shard-builder output directory (its
`manifests/*.json` list the finished shards; without manifests every `*.tar` below it), or a
prefix (`s3://bucket/train-` → `train-*.tar`); local paths or any fsspec URL. `group` keeps only
samples whose JSON `group` field equals it (e.g. two datasets from one shard set).

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

Robustness: an unreadable shard (`shard_error`), a truncated tar (`shard_truncated`, the samples
before the damage are kept), a sample without `.jpg` or with bad JSON when a group filter needs it
(`malformed`), and an undecodable or truncated JPEG (`decode_error`) are skipped, counted and
logged (rate-limited). A stream that finds no readable sample in two passes over its shards raises
a clear error instead of spinning; the DataLoader `timeout_s` turns a stalled read into an error.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import braceexpand
import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from midnight_train.masking import batch_masks

log = logging.getLogger(__name__)

REASONS = ("decode_error", "malformed", "shard_error", "shard_truncated")
STATE_VERSION = 1
# Seed tags: independent generator families derived from the same (seed, stream, index).
_TAG_EPOCH, _TAG_PULL, _TAG_GEOMETRY, _TAG_MASK = 101, 102, 103, 104


@dataclass
class DataConfig:
    """The `data:` section of the training config (plain YAML types; lists work for pairs)."""

    shards: str | list[str] | None = None
    datasets: list[dict[str, Any]] | None = None
    batch_size: int = 64  # per process
    num_workers: int = 4
    shuffle_buffer: int = 1000  # records shuffled together (one block); memory ≈ this × JPEG size
    shard_interleave: int = 4  # shards a stream reads from at once
    prefetch_factor: int = 2
    timeout_s: float = 600.0  # a worker silent for this long is an error, not a hang
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
        if (self.shards is None) == (self.datasets is None):
            raise ValueError("data: give exactly one of `shards` or `datasets`")
        for name in ("global_crop_scale", "local_crop_scale", "crop_ratio", "mask_ratio_min_max"):
            pair = getattr(self, name)
            if len(pair) != 2 or not pair[0] <= pair[1]:
                raise ValueError(f"data.{name} must be [low, high], got {pair!r}")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data: batch_size ≥ 1, num_workers ≥ 0 and shuffle_buffer ≥ 1 required")
        for spec in self.dataset_specs():
            unknown = set(spec) - {"shards", "weight", "group", "name"}
            if unknown or "shards" not in spec or float(spec.get("weight", 1.0)) <= 0:
                raise ValueError(f"data.datasets entry {spec!r}: needs `shards`, a weight > 0, "
                                 f"and only shards/weight/group/name")

    def dataset_specs(self) -> list[dict[str, Any]]:
        if self.datasets is None:
            return [{"shards": self.shards, "weight": 1.0, "group": None, "name": "default"}]
        return [dict(d) for d in self.datasets]


# ----------------------------------------------------------------------------------- sources


def list_shards(source: str | list[str]) -> list[str]:
    """Shard URLs of a source (see the module docstring), sorted within each source."""
    if isinstance(source, (list, tuple)):
        return [url for item in source for url in list_shards(item)]
    if "{" in source:  # listed as given: a missing one is skipped and counted when read
        return list(braceexpand.braceexpand(source))
    if source.endswith(".tar") and not any(c in source for c in "*?["):
        return [source]
    fs, path = fsspec.core.url_to_fs(source)

    def url(p: str) -> str:
        return fs.unstrip_protocol(p) if "://" in source else p

    if any(c in path for c in "*?["):
        return [url(p) for p in sorted(fs.glob(path))]
    if fs.isdir(path):
        listed = manifest_counts(source)
        if listed is not None:
            return [u for u, n in listed.items() if n is None or n > 0]
        return [url(p) for p in sorted(fs.glob(posixpath.join(path, "**", "*.tar")))]
    found = sorted(fs.glob(path + "*.tar"))
    if not found:
        raise FileNotFoundError(f"no shards found at {source!r}")
    return [url(p) for p in found]


def manifest_counts(source: str) -> dict[str, int | None] | None:
    """{shard URL: samples (None where the entry has no count)} from a shard-builder output
    directory's `manifests/*.json`, sorted by URL; None when `source` has no manifests."""
    fs, path = fsspec.core.url_to_fs(source)
    manifests = sorted(fs.glob(posixpath.join(path, "manifests", "*.json")))
    if not manifests:
        return None
    counts: dict[str, int | None] = {}
    for m in manifests:
        with fs.open(m, "rb") as f:
            for entry in json.load(f).get("shards", []):
                p = posixpath.join(path, entry["name"])
                n = entry.get("samples")
                counts[fs.unstrip_protocol(p) if "://" in source else p] = None if n is None else int(n)
    return dict(sorted(counts.items()))


def assign_shards(urls: list[str], stream: int, n_streams: int) -> list[tuple[str, int, int]]:
    """(url, stride, offset) triples stream `stream` reads: its own shards, or one shared shard
    of which it takes samples offset, offset + stride, … when shards are fewer than streams."""
    n = len(urls)
    if n == 0:
        raise ValueError("no shards to read")
    if n >= n_streams:
        return [(u, 1, 0) for u in urls[stream::n_streams]]
    sharers = list(range(stream % n, n_streams, n))
    return [(urls[stream % n], len(sharers), sharers.index(stream))]


# ------------------------------------------------------------------------------ shard reading


class Counters:
    """Skip counts by reason with rate-limited warnings (1st, 10th, 100th, … of each reason)."""

    def __init__(self, initial: dict[str, int] | None = None) -> None:
        self.counts = {r: 0 for r in REASONS}
        self.counts.update(initial or {})

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n & (n - 1) == 0 or math.log10(n).is_integer():
            log.warning("skipped (%s, %d so far): %s", reason, n, detail)


def shard_records(url: str, stride: int, offset: int, group: str | None,
                  counters: Counters) -> Iterator[dict[str, Any]]:
    """Raw samples ({__key__, jpg, json?}) of one shard, every stride-th from offset. Damage
    ends or skips with a count, never an exception."""
    try:
        stream = fsspec.open(url, "rb").open()
    except Exception as exn:  # missing, permission, network: the shard is skipped
        counters.skip("shard_error", f"{url}: {exn!r}")
        return

    def on_duplicate(exn: Exception) -> bool:
        counters.skip("malformed", f"{url}: {exn}")
        return True

    members = ({**m, "__url__": url} for m in tar_file_iterator(stream))
    try:
        for i, sample in enumerate(group_by_keys(members, handler=on_duplicate)):
            if i % stride != offset:
                continue
            if "jpg" not in sample:
                counters.skip("malformed", f"{url}: {sample['__key__']} has no .jpg")
                continue
            if group is not None:
                try:
                    if json.loads(sample["json"]).get("group") != group:
                        continue
                except Exception:
                    counters.skip("malformed", f"{url}: {sample['__key__']} has no valid .json")
                    continue
            yield sample
    except Exception as exn:  # truncated or corrupt tar: keep what came before
        counters.skip("shard_truncated", f"{url}: {exn!r}")
    finally:
        stream.close()


class _DatasetReader:
    """One dataset's shards for one stream: endless per-epoch permutations, interleaved slots."""

    def __init__(self, index: int, name: str, assigned: list[tuple[str, int, int]], group: str | None,
                 seed: list[int], interleave: int, counters: Counters) -> None:
        self.index, self.name, self.assigned, self.group = index, name, assigned, group
        self.seed, self.counters = seed, counters
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
        return [pick, 0, shard_records(url, stride, offset, self.group, self.counters)]

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
                raise RuntimeError(
                    f"dataset {self.name!r}: no readable samples in {len(self.assigned)} shard(s) "
                    f"assigned to this stream (e.g. {self.assigned[0][0]}); skip counts: "
                    f"{self.counters.counts}")
            self.slots[k] = self._open(self.next_pick)
            self.next_pick += 1


# -------------------------------------------------------------------------------- geometry


def random_resized_boxes(rng: np.random.Generator, shape: tuple[int, ...], scale: tuple[float, float],
                         ratio: tuple[float, float], tries: int = 10) -> np.ndarray:
    """RandomResizedCrop boxes [*shape, 4] (x0, y0, x1, y1) as fractions of a square tile: area
    fraction ~ U(scale), log aspect ~ U(log ratio), first of `tries` draws that fits, else the
    whole tile (torchvision's fallback for a square image)."""
    area = rng.uniform(scale[0], scale[1], shape + (tries,))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), shape + (tries,)))
    w, h = np.sqrt(area * aspect), np.sqrt(area / aspect)
    fits = (w <= 1) & (h <= 1)
    first = fits.argmax(-1)[..., None]
    any_fit = fits.any(-1)
    w = np.where(any_fit, np.take_along_axis(w, first, -1)[..., 0], 1.0)
    h = np.where(any_fit, np.take_along_axis(h, first, -1)[..., 0], 1.0)
    x0 = rng.random(shape) * (1 - w)
    y0 = rng.random(shape) * (1 - h)
    return np.stack([x0, y0, x0 + w, y0 + h], -1)


def draw_geometry(rng: np.random.Generator, n: int, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Crop boxes and flips/rotations for n samples (crops 0, 1 global, then the local ones)."""
    n_crops = 2 + cfg.n_local_crops
    ratio = tuple(cfg.crop_ratio)
    boxes = np.concatenate([
        random_resized_boxes(rng, (n, 2), tuple(cfg.global_crop_scale), ratio),
        random_resized_boxes(rng, (n, cfg.n_local_crops), tuple(cfg.local_crop_scale), ratio),
    ], axis=1)
    hflip = rng.random((n, n_crops)) < 0.5
    if not cfg.hflip:
        hflip[:] = False
    rot = rng.integers(0, 4, (n, n_crops)) if cfg.vflip_rot90 else np.zeros((n, n_crops), dtype=np.int64)
    return {"boxes": boxes, "hflip": hflip, "rot": rot}


def decode_tile(jpg: bytes) -> Image.Image:
    """Fully decoded RGB image; raises on corrupt or truncated data (PIL does not pad)."""
    img = Image.open(io.BytesIO(jpg))
    img.load()
    if img.width < 2 or img.height < 2:
        raise ValueError(f"tile too small: {img.size}")
    return img if img.mode == "RGB" else img.convert("RGB")


def _pixels(img: Image.Image, size: int, box: tuple[float, float, float, float],
                   rawmode: str, ystep: int) -> bytes:
    """The resized crop's packed 3-byte pixels in `rawmode` order, rows bottom-up for ystep −1."""
    resized = img.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return resized.tobytes("raw", rawmode, 0, ystep)




def crop(img: Image.Image, box: np.ndarray, size: int, hflip: bool, rot: int,
         out: np.ndarray | None = None) -> np.ndarray:
    """One random-resized crop of an RGB tile: a single bicubic, antialiased PIL resize of the
    sub-pixel box (PIL scales the filter support with the reduction), then flip and rotate
    (k × 90° counter-clockwise, as PIL's ROTATE_90). Returns HWC uint8 [size, size, 3]
    (channels last), written into `out` (C-contiguous) when given.

    The pixels leave PIL packed by its raw encoder and land in `out` with one numpy copy: no
    intermediate array, no transpose. A horizontal flip costs nothing extra: PIL packs the
    rows bottom-up in BGR order (vertical flip + channel reversal) and that byte string read
    backwards is the horizontally flipped RGB image (a vertical flip then a 180° turn).
    Rotations (the `vflip_rot90` option) go through strided numpy views."""
    w, h = img.size
    fbox = (float(box[0]) * w, float(box[1]) * h, float(box[2]) * w, float(box[3]) * h)
    if out is None:
        out = np.empty((size, size, 3), dtype=np.uint8)
    elif out.shape != (size, size, 3) or not out.flags.c_contiguous:
        raise ValueError(f"crop: out must be C-contiguous [{size}, {size}, 3], got {out.shape}")
    if rot:
        view = np.frombuffer(_pixels(img, size, fbox, "RGB", 0), dtype=np.uint8).reshape(size, size, 3)
        if hflip:
            view = view[:, ::-1]
        out[...] = np.rot90(view, int(rot), axes=(0, 1))
    elif hflip:
        out.reshape(-1)[...] = np.frombuffer(_pixels(img, size, fbox, "BGR", -1), dtype=np.uint8)[::-1]
    else:
        out.reshape(-1)[...] = np.frombuffer(_pixels(img, size, fbox, "RGB", 0), dtype=np.uint8)
    return out


# ---------------------------------------------------------------------------- the stream


class SampleStream:
    """One logical worker's endless stream of batches (runs inside a DataLoader worker)."""

    def __init__(self, cfg: DataConfig, shard_lists: list[list[str]], *, seed: int, stream: int,
                 n_streams: int, worker: int, position: dict[str, Any] | None = None,
                 include_images: bool = False) -> None:
        self.cfg, self.worker, self.include_images = cfg, worker, include_images
        self.seed = [int(seed) & 0xFFFFFFFF, n_streams, stream]
        self.counters = Counters()
        specs = cfg.dataset_specs()
        self.weights = np.array([float(s.get("weight", 1.0)) for s in specs])
        self.weights /= self.weights.sum()
        self.readers = [
            _DatasetReader(i, str(s.get("name") or f"dataset{i}"),
                           assign_shards(urls, stream, n_streams), s.get("group"),
                           self.seed, cfg.shard_interleave, self.counters)
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
            self.counters.counts.update(position["counters"])  # restore ran silently counted

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
                "batches": self.batches, "readers": self.block_start, "counters": dict(self.counters.counts)}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        b, g, loc, nl = cfg.batch_size, cfg.global_crop_size, cfg.local_crop_size, cfg.n_local_crops
        bad_run = 0
        while True:
            # crops are written straight into the batch arrays the tensors wrap (no collation
            # copy), channels last: each crop is PIL's own HWC byte order, so no transpose
            gbuf = np.empty((2, b, g, g, 3), dtype=np.uint8)
            lbuf = np.empty((nl, b, loc, loc, 3), dtype=np.uint8)
            keys: list[str] = []
            images: list[np.ndarray] = []
            while len(keys) < b:
                if self.offset == len(self.records):
                    self.block += 1
                    self._pull_block()
                    self.offset = 0
                i = self.offset
                self.offset += 1
                record = self.records[i]
                try:
                    img = decode_tile(record["jpg"])
                except Exception as exn:
                    self.counters.skip("decode_error", f"{record.get('__url__')}: {record['__key__']}: {exn!r}")
                    bad_run += 1
                    if bad_run > 10 * cfg.shuffle_buffer + 1000:
                        raise RuntimeError(f"{bad_run} undecodable samples in a row: the shards "
                                           f"hold no usable JPEG tiles ({self.counters.counts})") from exn
                    continue
                bad_run = 0
                j = len(keys)
                boxes, hflips, rots = self.geometry["boxes"][i], self.geometry["hflip"][i], self.geometry["rot"][i]
                for c in range(2 + nl):
                    crop(img, boxes[c], g if c < 2 else loc, hflips[c], rots[c],
                         out=gbuf[c, j] if c < 2 else lbuf[c - 2, j])
                keys.append(record["__key__"])
                if self.include_images:
                    images.append(np.asarray(img))
            rng = np.random.default_rng(self.seed + [_TAG_MASK, self.batches])
            masks = batch_masks(rng, 2 * b, g // cfg.patch_size,
                                sample_probability=cfg.mask_sample_probability,
                                ratio_min_max=tuple(cfg.mask_ratio_min_max),
                                max_fraction=cfg.mask_max_fraction, min_patches=cfg.mask_min_patches)
            self.batches += 1
            batch = {
                # [2, B, 3, G, G] / [n_local, B, 3, L, L] views of the channels-last buffers
                "global_crops": torch.from_numpy(gbuf).permute(0, 1, 4, 2, 3),
                "local_crops": torch.from_numpy(lbuf).permute(0, 1, 4, 2, 3),
                "masks": torch.from_numpy(masks),
                "keys": keys,
                "_position": self.position(),
            }
            if self.include_images:
                batch["_images"] = images
            yield batch


class ShardStreamDataset(IterableDataset):
    """The DataLoader-facing dataset: maps each worker to its logical stream and start position."""

    def __init__(self, cfg: DataConfig, shard_lists: list[list[str]], *, seed: int, rank: int,
                 world_size: int) -> None:
        self.cfg, self.shard_lists, self.seed = cfg, shard_lists, seed
        self.rank, self.world_size = rank, world_size
        self.n_workers = max(1, cfg.num_workers)
        self.positions: list[dict[str, Any] | None] = [None] * self.n_workers
        self.rotation = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = ((info.id if info is not None else 0) + self.rotation) % self.n_workers
        stream = SampleStream(self.cfg, self.shard_lists, seed=self.seed,
                              stream=self.rank * self.n_workers + worker,
                              n_streams=self.world_size * self.n_workers, worker=worker,
                              position=self.positions[worker])
        return iter(stream)


class Loader:
    """Endless batches with a resumable position; see the module docstring for the contract."""

    def __init__(self, cfg: DataConfig, *, seed: int, rank: int, world_size: int,
                 state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.identity = {"seed": int(seed), "rank": int(rank), "world_size": int(world_size),
                         "num_workers": int(cfg.num_workers)}
        self.consumed = 0
        stream_seed = int(seed)
        n_workers = max(1, cfg.num_workers)
        positions: list[dict[str, Any] | None] = [None] * n_workers
        if state is not None:
            self.consumed = int(state["batches"])
            same = {k: state.get(k) for k in self.identity} == self.identity
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
        shard_lists = [list_shards(s["shards"]) for s in cfg.dataset_specs()]
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
        for batch in batches:
            position = batch.pop("_position")
            self.positions[position["worker"]] = position
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **self.identity, "stream_seed": self.stream_seed,
                "batches": self.consumed, "workers": json.loads(json.dumps(self.positions))}

    def counters(self) -> dict[str, int]:
        total = {r: 0 for r in REASONS}
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


def config_from_dict(section: dict[str, Any]) -> DataConfig:
    """DataConfig from a YAML `data:` section, rejecting unknown keys with their names."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"unknown data config keys: {unknown}")
    return DataConfig(**section)


__all__ = ["DataConfig", "Loader", "make_loader", "list_shards", "manifest_counts", "assign_shards",
           "REASONS", "config_from_dict"]

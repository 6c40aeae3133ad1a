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
in one run) trains from whole-slide images by online patching: `midnight_train.data.slide_stream`,
with the tile parameters `tiles` (midnight-prep's), `slide_pool`, `draws_per_slide` and
`mask_cache_dir`. Its streams follow the same contract (batches, positions, worker rotation)
with every draw seeded by its index; its module docstring says how. The rest of this docstring
is about shards.

How the shard streams are built, and why resume is exact: `midnight_train.data.shard_stream`;
the slide streams: `midnight_train.data.slide_stream`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from midnight_train.data.config import DataConfig
from midnight_train.data.shard_stream import ShardStreamDataset
from midnight_train.data.sources import check_reachable, repeated_shards, shard_counts
from midnight_train.data.streams import StreamDataset

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Seconds the workers get to stop when the loader closes; then they are killed (they block the
# stop signals, so SIGTERM would not end one stuck in a slide download or a wait for cache room).
STOP_WORKERS_S = 5.0


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
        self._batches: Any = None  # the DataLoader iterator whose workers run now
        if self.source == "slides":
            from midnight_train.data.slide_stream import SlideStreamDataset

            self.dataset: StreamDataset = SlideStreamDataset(cfg, seed=stream_seed, rank=rank,
                                                             world_size=world_size)
            return
        shard_lists = []
        by_group: dict[Any, list[str]] = {}
        for spec in cfg.dataset_specs():
            listed = shard_counts(spec["shards"])
            shard_lists.append([url for url, _ in listed])
            # The same shards twice (data.shards=[OUT, OUT], or two datasets of one group) would
            # read every sample twice per epoch without a word.
            group = by_group.setdefault(spec.get("group"), [])
            group.extend(shard_lists[-1])
            repeated = repeated_shards(group)
            if repeated:
                raise ValueError(
                    f"data: {len(repeated)} shard(s) of dataset {spec.get('name')!r} are listed "
                    f"more than once (e.g. {repeated[0]}), so their samples would be read twice "
                    f"per epoch; give each shard source once (to weight a dataset use "
                    f"data.datasets with a weight)")
            if listed:
                check_reachable(listed[0][0])
            known = [n for _, n in listed if n is not None]
            if len(known) == len(listed) and sum(known) < cfg.batch_size * world_size:
                log.warning("dataset %r has %d samples, fewer than one global batch (%d × %d "
                            "processes): every batch repeats tiles", spec.get("name"),
                            sum(known), cfg.batch_size, world_size)
        self.dataset = ShardStreamDataset(cfg, shard_lists, seed=stream_seed, rank=rank,
                                          world_size=world_size)

    @property
    def pin_memory(self) -> bool:
        """Batches in page-locked memory (``data.pin_memory``; default: when CUDA is there)."""
        return torch.cuda.is_available() if self.cfg.pin_memory is None else self.cfg.pin_memory

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
                            generator=torch.Generator().manual_seed(self.stream_seed),
                            pin_memory=self.pin_memory, **extra)
        self.close()  # one iterator at a time
        self._batches = iter(loader)  # workers start now, not at the first next()
        return self._hand_out(self._batches)

    def _hand_out(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        try:
            for batch in batches:
                position = batch.pop("_position")
                self.positions[position["worker"]] = position
                self.consumed += 1
                yield batch
        finally:  # also when a worker has failed
            self.close()

    def close(self) -> None:
        """Stop the workers, within STOP_WORKERS_S: asked first, then killed. The trainer calls
        it on every way out of ``fit`` (an error in the step or an evaluation leaves the
        iterator suspended, and the workers, which block SIGTERM, would keep the process from
        exiting). Positions stay: a new ``iter()`` continues from them."""
        batches, self._batches = self._batches, None
        workers = list(getattr(batches, "_workers", ()))
        if workers and not getattr(batches, "_shutdown", True):
            try:  # torch's own shutdown waits 5 s per worker, then SIGTERM: ignored here
                batches._workers_done_event.set()
                for i, alive in enumerate(batches._workers_status):
                    if alive:
                        batches._mark_worker_as_unavailable(i, shutdown=True)
            except (AttributeError, OSError, ValueError):
                pass
            deadline = time.monotonic() + STOP_WORKERS_S
            for w in workers:
                w.join(max(0.0, deadline - time.monotonic()))
            stuck = [w for w in workers if w.is_alive()]
            if stuck:
                log.warning("%d data loader worker(s) did not stop within %g s: killed",
                            len(stuck), STOP_WORKERS_S)
                # not reported as "worker killed by signal" by torch's SIGCHLD handler
                from torch.utils.data import _utils

                if getattr(batches, "_worker_pids_set", False):
                    _utils.signal_handling._remove_worker_pids(id(batches))
                    batches._worker_pids_set = False
                for w in stuck:
                    w.kill()
                for w in stuck:
                    w.join(1.0)
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

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

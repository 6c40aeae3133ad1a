"""What every training stream shares: the DataLoader-facing dataset that maps each worker to its
logical stream and start position, and the iBOT masks of a batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from midnight_train.data.config import DataConfig
from midnight_train.data.masking import batch_masks, masked_positions
from midnight_train.data.records import REASONS


def ibot_masks(cfg: DataConfig, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """The iBOT masks of one batch's global crops: ``masks`` [2·B, (G // patch)²] crop-major,
    with ``mask_indices`` and ``mask_weights`` of the masked patches (``masked_positions``)."""
    masks = batch_masks(
        rng, 2 * cfg.batch_size, cfg.global_crop_size // cfg.patch_size,
        sample_probability=cfg.mask_sample_probability, ratio_min_max=tuple(cfg.mask_ratio_min_max),
        max_fraction=cfg.mask_max_fraction, min_patches=cfg.mask_min_patches)
    indices, weights = masked_positions(masks)
    return {"masks": torch.from_numpy(masks), "mask_indices": torch.from_numpy(indices),
            "mask_weights": torch.from_numpy(weights)}


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

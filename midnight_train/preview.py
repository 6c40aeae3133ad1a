"""A PNG grid to sanity-check augmentation: per sample, the original tile, then its two augmented
global crops and its local crops, exactly as the training pipeline produces them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from midnight_train.augment import AugmentConfig, ColorAugment
from midnight_train.data import DataConfig, SampleStream, list_shards

PAD = 4


def _to_uint8(x: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """Undo normalisation: [n, 3, H, W] float → [n, H, W, 3] uint8."""
    m = torch.tensor(mean)[None, :, None, None]
    s = torch.tensor(std)[None, :, None, None]
    return ((x.cpu() * s + m).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def preview_batch(data_cfg: DataConfig, aug_cfg: AugmentConfig, *, n_samples: int = 4,
                  seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(original tiles, augmented global crops [2, n, G, G, 3], local crops [n_local, n, L, L, 3])."""
    cfg = dataclasses.replace(data_cfg, batch_size=n_samples, num_workers=0,
                              shuffle_buffer=min(data_cfg.shuffle_buffer, 8 * n_samples))
    shard_lists = [list_shards(s["shards"]) for s in cfg.dataset_specs()]
    stream = SampleStream(cfg, shard_lists, seed=seed, stream=0, n_streams=1, worker=0,
                          include_images=True)
    batch = next(iter(stream))
    out = ColorAugment(aug_cfg)(batch, torch.Generator().manual_seed(seed))
    mean, std = list(aug_cfg.mean), list(aug_cfg.std)
    g = _to_uint8(out["global_crops"], mean, std)
    g = g.reshape(2, n_samples, *g.shape[1:])
    loc = _to_uint8(out["local_crops"], mean, std)
    loc = loc.reshape(cfg.n_local_crops, n_samples, *loc.shape[1:])
    return batch["_images"], g, loc


def render_preview(data_cfg: DataConfig, aug_cfg: AugmentConfig, out: str | Path, *,
                   n_samples: int = 4, seed: int = 0) -> Path:
    """Write the grid: one row per sample: original | global 1 | global 2 | locals (2 rows)."""
    originals, g, loc = preview_batch(data_cfg, aug_cfg, n_samples=n_samples, seed=seed)
    gs = g.shape[2]
    n_local = loc.shape[0]
    cell = min(loc.shape[2], (gs - PAD) // 2)  # locals shown at natural size when they fit
    cols = (n_local + 1) // 2
    width = PAD + 3 * (gs + PAD) + cols * (cell + PAD)
    height = PAD + n_samples * (gs + PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for i in range(n_samples):
        y = PAD + i * (gs + PAD)
        canvas.paste(Image.fromarray(np.asarray(originals[i], dtype=np.uint8)).resize((gs, gs), Image.Resampling.LANCZOS), (PAD, y))
        for c in range(2):
            canvas.paste(Image.fromarray(g[c, i]), (PAD + (c + 1) * (gs + PAD), y))
        for k in range(n_local):
            tile = Image.fromarray(loc[k, i]).resize((cell, cell), Image.Resampling.LANCZOS)
            canvas.paste(tile, (PAD + 3 * (gs + PAD) + (k // 2) * (cell + PAD), y + (k % 2) * (cell + PAD)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out

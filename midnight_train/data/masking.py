"""iBOT block masks, produced with each batch (DINOv2's MaskingGenerator + collate, re-derived).

For a batch whose global crops are flattened crop-major to N = 2·B images:
- `int(N · sample_probability)` of them get a mask; their target ratios are spread over the
  batch: image i draws its ratio uniformly from the i-th of that many equal sub-intervals of
  [ratio_min, ratio_max], so one batch covers the whole range;
- each mask is grown from random rectangular blocks (area uniform between `min_patches` and the
  patches still to mask, as DINOv2 draws it also when fewer than `min_patches` remain; aspect
  ratio log-uniform in [0.3, 1/0.3]) until it reaches its target count, never exceeding
  `max_fraction` of the patches (a block that would overshoot is redrawn, up to 10 tries);
- the rest get empty masks, then the order of the N masks is shuffled.
All randomness comes from the numpy Generator passed in, so a batch's masks are reproducible.
`masked_positions` gives what the iBOT loss needs of them with a count known on the host: the
flat indices of the masked patches and their weights (1 / masked count of the image).
"""

from __future__ import annotations

import math

import numpy as np

LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))


def _add_block(mask: np.ndarray, rng: np.random.Generator, max_new: int, min_patches: int) -> int:
    """Mask one random block adding between 1 and max_new new patches; returns how many."""
    height, width = mask.shape
    for _ in range(10):
        # DINOv2's draw: area between min_patches and max_new even when max_new < min_patches
        # (then in [max_new, min_patches]: a block that overlaps the mask, or none). Aiming at
        # exactly max_new would end most masks in single-patch specks.
        area = min_patches + (max_new - min_patches) * rng.random()
        aspect = math.exp(rng.uniform(*LOG_ASPECT))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if 0 < h < height and 0 < w < width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(np.count_nonzero(block))
            if 0 < new <= max_new:
                block[...] = True
                return new
    return 0


def block_mask(rng: np.random.Generator, grid: int, n_target: int, *, min_patches: int = 4,
               max_patches: int | None = None) -> np.ndarray:
    """A [grid, grid] bool mask with at most n_target (and at most max_patches) patches set."""
    mask = np.zeros((grid, grid), dtype=bool)
    limit = n_target if max_patches is None else min(n_target, max_patches)
    count = 0
    while count < limit:
        added = _add_block(mask, rng, limit - count, min_patches)
        if added == 0:
            break
        count += added
    return mask


def batch_masks(rng: np.random.Generator, n_images: int, grid: int, *, sample_probability: float = 0.5,
                ratio_min_max: tuple[float, float] = (0.1, 0.5), max_fraction: float = 0.5,
                min_patches: int = 4) -> np.ndarray:
    """Masks [n_images, grid*grid] (bool) for the crop-major flattened global crops of a batch."""
    n_patches = grid * grid
    n_masked = int(n_images * sample_probability)
    bounds = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)
    max_patches = int(max_fraction * n_patches)
    masks = np.zeros((n_images, n_patches), dtype=bool)
    for i in range(n_masked):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks[i] = block_mask(rng, grid, int(n_patches * ratio), min_patches=min_patches,
                              max_patches=max_patches).reshape(-1)
    return masks[rng.permutation(n_images)]


def masked_positions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the masked patches of ``masks`` [N, P] (row-major: what boolean indexing
    selects, in that order) and each one's iBOT weight, 1 / (masked patches of its image), so
    every masked image counts once. Made with the batch, so the device never has to tell the
    host how many patches are masked."""
    masks = np.asarray(masks, dtype=bool)
    indices = np.flatnonzero(masks).astype(np.int64)
    per_image = masks.sum(axis=1).astype(np.float32)
    weights = np.float32(1.0) / per_image[indices // max(masks.shape[1], 1)]
    return indices, weights.astype(np.float32)

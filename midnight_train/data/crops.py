"""Crop geometry and packing: the DINOv2 multi-crop views of decoded tiles, drawn as numbers
first (boxes, flips, rotations from a seeded generator) and then cut by PIL straight into the
uint8 batch arrays the tensors wrap."""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from midnight_train.data.config import DataConfig


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


class CropBatch:
    """One batch of multi-crop views, filled sample by sample. Crops are written straight into
    the arrays the batch tensors wrap (no collation copy), channels last: each crop is PIL's own
    HWC byte order, so there is no transpose either."""

    def __init__(self, batch_size: int, cfg: DataConfig) -> None:
        g, loc, nl = cfg.global_crop_size, cfg.local_crop_size, cfg.n_local_crops
        self.size, self.n_local = batch_size, nl
        self.crop_sizes = (g, loc)
        self.globals = np.empty((2, batch_size, g, g, 3), dtype=np.uint8)
        self.locals = np.empty((nl, batch_size, loc, loc, 3), dtype=np.uint8)
        self.keys: list[str] = []

    def full(self) -> bool:
        return len(self.keys) == self.size

    def add(self, key: str, img: Image.Image, geometry: dict[str, np.ndarray], i: int) -> None:
        """Cut sample `img`'s crops with row `i` of `geometry` (from `draw_geometry`)."""
        j = len(self.keys)
        g, loc = self.crop_sizes
        boxes, hflips, rots = geometry["boxes"][i], geometry["hflip"][i], geometry["rot"][i]
        for c in range(2 + self.n_local):
            target = self.globals[c, j] if c < 2 else self.locals[c - 2, j]
            crop(img, boxes[c], g if c < 2 else loc, hflips[c], rots[c], out=target)
        self.keys.append(key)

    def tensors(self) -> dict[str, Any]:
        """`global_crops` [2, B, 3, G, G] and `local_crops` [n_local, B, 3, L, L] uint8 (views of
        the channels-last arrays), and `keys`."""
        return {"global_crops": torch.from_numpy(self.globals).permute(0, 1, 4, 2, 3),
                "local_crops": torch.from_numpy(self.locals).permute(0, 1, 4, 2, 3),
                "keys": self.keys}

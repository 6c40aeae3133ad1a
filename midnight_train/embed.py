"""Tile embeddings for downstream use: CLS token concatenated with the mean of the patch tokens
(CLS+Mean) of the backbone's final-norm output, as in the Midnight paper."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path, PurePosixPath

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from midnight_prep.shards import read_shard
from midnight_train.crops import decode_tile

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


@torch.no_grad()
def cls_mean_embedding(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[B, 2 * dim]``: CLS and mean patch token of ``forward_features`` (after the final
    norm). Register tokens are neither CLS nor patches and are left out of the mean."""
    tokens = model.forward_features(images)
    prefix = getattr(model, "num_prefix_tokens", 1)
    return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)


def iter_encoded(inputs: list[str], skip: Callable[[str], None]) -> Iterator[tuple[str, bytes]]:
    """(key, encoded image) from image files, directories of images and webdataset .tar shards
    (local paths or fsspec URLs). A shard that cannot be read, or breaks off, is reported to
    `skip` and the inputs go on."""
    for item in inputs:
        suffix = PurePosixPath(item).suffix.lower()
        if "://" not in item and Path(item).is_dir():
            yield from iter_encoded([str(p) for p in sorted(Path(item).rglob("*"))
                                     if p.suffix.lower() in IMAGE_SUFFIXES | {".tar"}], skip)
        elif suffix == ".tar":
            try:
                for key, files in read_shard(item, on_duplicate=skip):
                    image = next((files[e] for e in ("jpg", "jpeg", "png") if e in files), None)
                    if image is None:
                        skip(f"{item}: {key} has no .jpg/.jpeg/.png")
                    else:
                        yield key, image
            except Exception as exn:
                skip(f"{item}: unreadable or damaged shard ({exn})")
        elif suffix in IMAGE_SUFFIXES:
            with fsspec.open(item, "rb") as f:
                yield item, f.read()
        else:
            raise ValueError(f"{item}: not an image, a directory or a .tar shard")


def to_tensor(img: Image.Image, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False)[0].clamp(0, 1)
    return (x - mean) / std


class Embedder:
    """An exported backbone with its preprocessing (input size, mean/std from the export):
    encoded images in, CLS+Mean embeddings out, in batches."""

    def __init__(self, weights: str | Path, *, img_size: int | None = None, batch_size: int = 64,
                 device: str | None = None) -> None:
        from midnight_train.export import load_exported, read_metadata

        meta = read_metadata(weights)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_exported(weights).to(self.device)
        self.size = img_size or int(json.loads(meta["timm_kwargs"])["img_size"])
        self.mean = torch.tensor(json.loads(meta.get("mean", "[0.485, 0.456, 0.406]"))).view(3, 1, 1)
        self.std = torch.tensor(json.loads(meta.get("std", "[0.229, 0.224, 0.225]"))).view(3, 1, 1)
        self.batch_size = batch_size

    def __call__(self, items: Iterable[tuple[str, bytes]], skip: Callable[[str], None],
                 ) -> tuple[list[str], np.ndarray]:
        """(keys, embeddings float32 [N, 2·dim]) of the images that decode; the others go to
        `skip` with their key and the reason."""
        keys: list[str] = []
        chunks: list[np.ndarray] = []
        pending: list[torch.Tensor] = []

        def flush() -> None:
            if pending:
                batch = torch.stack(pending).to(self.device)
                chunks.append(cls_mean_embedding(self.model, batch).float().cpu().numpy())
                pending.clear()

        for key, data in items:
            try:
                img = decode_tile(data)
            except Exception as exn:
                skip(f"{key}: not a readable image ({exn})")
                continue
            keys.append(key)
            pending.append(to_tensor(img, self.size, self.mean, self.std))
            if len(pending) == self.batch_size:
                flush()
        flush()
        return keys, np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def embed_inputs(weights: str | Path, inputs: list[str], out: str | Path, *,
                 img_size: int | None = None, batch_size: int = 64,
                 device: str | None = None, skipped: list[str] | None = None) -> tuple[int, int]:
    """Embed every input tile with an exported backbone and write ``out`` (.npz with ``keys`` and
    ``embeddings`` float32 ``[N, 2 * dim]``). Returns (tiles, embedding dimension). Unreadable
    images and shards are skipped and described in ``skipped`` (when given)."""
    skipped = [] if skipped is None else skipped
    embedder = Embedder(weights, img_size=img_size, batch_size=batch_size, device=device)
    keys, emb = embedder(iter_encoded(inputs, skipped.append), skipped.append)
    np.savez(out, keys=np.array(keys), embeddings=emb)
    return len(keys), emb.shape[1] if emb.ndim == 2 else 0

"""Tile embeddings for downstream use: CLS token concatenated with the mean of the patch tokens
(CLS+Mean) of the backbone's final-norm output, as in the Midnight paper."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


@torch.no_grad()
def cls_mean_embedding(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[B, 2 * dim]``: CLS and mean patch token of ``forward_features`` (after the final
    norm). Register tokens are neither CLS nor patches and are left out of the mean."""
    tokens = model.forward_features(images)
    prefix = getattr(model, "num_prefix_tokens", 1)
    return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)


def iter_images(inputs: list[str]) -> Iterator[tuple[str, Image.Image]]:
    """(key, RGB image) from image files, directories of images and webdataset .tar shards."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from iter_images([str(p) for p in sorted(path.rglob("*"))
                                    if p.suffix.lower() in IMAGE_SUFFIXES | {".tar"}])
        elif path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in tar:
                    name = member.name
                    if member.isfile() and Path(name).suffix.lower() in {".jpg", ".jpeg", ".png"}:
                        data = tar.extractfile(member).read()
                        yield name.split(".", 1)[0], Image.open(io.BytesIO(data)).convert("RGB")
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            yield str(path), Image.open(path).convert("RGB")
        else:
            raise ValueError(f"{item}: not an image, a directory or a .tar shard")


def to_tensor(img: Image.Image, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False)[0].clamp(0, 1)
    return (x - mean) / std


def embed_inputs(weights: str | Path, inputs: list[str], out: str | Path, *,
                 img_size: int | None = None, batch_size: int = 64,
                 device: str | None = None) -> tuple[int, int]:
    """Embed every input tile with an exported backbone and write ``out`` (.npz with ``keys`` and
    ``embeddings`` float32 ``[N, 2 * dim]``). Returns (tiles, embedding dimension)."""
    from midnight_train.export import load_exported, read_metadata

    meta = read_metadata(weights)
    model = load_exported(weights)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    size = img_size or int(json.loads(meta["timm_kwargs"])["img_size"])
    mean = torch.tensor(json.loads(meta.get("mean", "[0.485, 0.456, 0.406]"))).view(3, 1, 1)
    std = torch.tensor(json.loads(meta.get("std", "[0.229, 0.224, 0.225]"))).view(3, 1, 1)
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            batch = torch.stack(pending).to(dev)
            chunks.append(cls_mean_embedding(model, batch).float().cpu().numpy())
            pending.clear()

    for key, img in iter_images(inputs):
        keys.append(key)
        pending.append(to_tensor(img, size, mean, std))
        if len(pending) == batch_size:
            flush()
    flush()
    emb = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    np.savez(out, keys=np.array(keys), embeddings=emb)
    return len(keys), emb.shape[1] if emb.ndim == 2 else 0

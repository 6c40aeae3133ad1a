"""Tile embeddings for downstream use: CLS token concatenated with the mean of the patch tokens
(CLS+Mean) of the backbone's final-norm output, as in the Midnight paper.

Inputs (image files, folders of images, webdataset shards, whole slides; local or fsspec URLs)
are decoded and resized in DataLoader workers, each taking whole inputs (a shard, an image file,
a slide) in turn; the model runs batched in the main process (bf16 autocast on a GPU). Tiles of
a slide are cut by the shard builder's own code (`midnight_prep.job.process_slide`: tissue mask,
uniform positions, µm/px, HSV filter), so they are the tiles a shard build would hold."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from midnight_prep.plan import SLIDE_EXTENSIONS
from midnight_prep.shards import read_shard
from midnight_train.data.crops import decode_tile

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
# Whole slides: every slide format but TIFF, which tile images use too (BACH's, say).
SLIDE_SUFFIXES = set(SLIDE_EXTENSIONS) - IMAGE_SUFFIXES


@dataclass(frozen=True)
class SlideSampling:
    """How whole-slide inputs become tiles: `tiles` per slide at each of `mpps` (µm/px)."""

    mpps: tuple[float, ...] = (0.5,)
    tiles: int = 100
    tile_size: int = 256
    seed: int = 0


@torch.no_grad()
def cls_mean_embedding(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[B, 2 * dim]``: CLS and mean patch token of ``forward_features`` (after the final
    norm). Register tokens are neither CLS nor patches and are left out of the mean."""
    tokens = model.forward_features(images)
    prefix = getattr(model, "num_prefix_tokens", 1)
    return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Local folders replaced by the images, shards and slides below them (sorted); the rest as
    given."""
    known = IMAGE_SUFFIXES | {".tar"} | SLIDE_SUFFIXES
    out: list[str] = []
    for item in inputs:
        if "://" not in item and Path(item).is_dir():
            out += [str(p) for p in sorted(Path(item).rglob("*")) if p.suffix.lower() in known]
        elif PurePosixPath(item).suffix.lower() in known:
            out.append(item)
        else:
            raise ValueError(f"{item}: not an image, a directory, a .tar shard or a slide "
                             f"({', '.join(sorted(SLIDE_SUFFIXES))})")
    return out


def slide_tiles(path: str, sampling: SlideSampling, skip: Callable[[str], None]
                ) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, JPEG, metadata) of tiles the shard builder cuts from one local slide."""
    from midnight_prep.job import process_slide
    from midnight_prep.plan import BuildParams, SlideSpec, mpp_key
    from midnight_prep.shards import safe_slide_id

    tiles: list[tuple[str, bytes, dict[str, Any]]] = []
    params = BuildParams(mpps=sampling.mpps, tile_size=sampling.tile_size, seed=sampling.seed)
    spec = SlideSpec(path, safe_slide_id(Path(path).name.split(".")[0]),
                     quotas={mpp_key(m): sampling.tiles for m in sampling.mpps})
    report = process_slide(spec, params, lambda key, jpeg, meta: tiles.append((key, jpeg, meta)))
    if report.status != "ok":
        skip(f"{path}: {report.error}")
    for mpp, reason in report.skipped_mpps.items():
        skip(f"{path}: no tiles at {mpp} µm/px ({reason})")
    yield from tiles


def iter_encoded(inputs: list[str], skip: Callable[[str], None],
                 sampling: SlideSampling = SlideSampling(),
                 ) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, encoded image, the sample's JSON or {}) from image files, directories of images,
    webdataset .tar shards (local paths or fsspec URLs) and local slides (tiles as `sampling`
    says). A shard that cannot be read, or breaks off, is reported to `skip` and the inputs go
    on; so is a slide that cannot be read."""
    for item in expand_inputs(inputs):
        suffix = PurePosixPath(item).suffix.lower()
        if suffix in SLIDE_SUFFIXES:
            yield from slide_tiles(item, sampling, skip)
        elif suffix == ".tar":
            try:
                for key, files in read_shard(item, on_duplicate=skip):
                    image = next((files[e] for e in ("jpg", "jpeg", "png") if e in files), None)
                    if image is None:
                        skip(f"{item}: {key} has no .jpg/.jpeg/.png")
                        continue
                    try:
                        meta = json.loads(files["json"]) if "json" in files else {}
                    except ValueError:
                        meta = {}
                    yield key, image, meta if isinstance(meta, dict) else {}
            except Exception as exn:
                skip(f"{item}: unreadable or damaged shard ({exn})")
        else:
            try:
                with fsspec.open(item, "rb") as f:
                    data = f.read()
            except OSError as exn:
                skip(f"{item}: cannot be read ({exn})")
                continue
            yield item, data, {}


def to_tensor(img: Image.Image, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[3, size, size] normalised float: a bicubic, antialiased PIL resize when the size differs."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (x - mean) / std


class _DecodedBatches(IterableDataset):
    """Batches of decoded, resized, normalised tiles; worker w of n takes inputs w, w + n, …"""

    def __init__(self, inputs: list[str], size: int, mean: torch.Tensor, std: torch.Tensor,
                 batch_size: int, sampling: SlideSampling) -> None:
        self.inputs, self.size, self.mean, self.std = inputs, size, mean, std
        self.batch_size, self.sampling = batch_size, sampling

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped: list[str] = []
        keys: list[str] = []
        metas: list[dict] = []
        order: list[tuple[int, int]] = []  # (input, sample within it): input order at the end
        tensors: list[torch.Tensor] = []
        for i in range(worker, len(self.inputs), n):
            for j, (key, data, meta) in enumerate(iter_encoded([self.inputs[i]], skipped.append,
                                                                self.sampling)):
                try:
                    tensors.append(to_tensor(decode_tile(data), self.size, self.mean, self.std))
                except Exception as exn:
                    skipped.append(f"{key}: not a readable image ({exn})")
                    continue
                keys.append(key)
                metas.append(meta)
                order.append((i, j))
                if len(keys) == self.batch_size:
                    yield {"keys": keys, "x": torch.stack(tensors), "meta": metas,
                           "order": order, "skipped": skipped}
                    keys, metas, order, tensors, skipped = [], [], [], [], []
        if keys or skipped:
            yield {"keys": keys, "x": torch.stack(tensors) if tensors else None, "meta": metas,
                   "order": order, "skipped": skipped}


class Embedder:
    """An exported backbone with its preprocessing (input size, mean/std from the export):
    images in, CLS+Mean embeddings out, in batches."""

    def __init__(self, weights: str | Path, *, img_size: int | None = None, batch_size: int = 64,
                 num_workers: int = 0, device: str | None = None, cls_only: bool = False) -> None:
        from midnight_train.outputs.export import load_exported, read_metadata

        meta = read_metadata(weights)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_exported(weights).to(self.device)
        self.size = img_size or int(json.loads(meta["timm_kwargs"])["img_size"])
        self.mean = torch.tensor(json.loads(meta.get("mean", "[0.485, 0.456, 0.406]"))).view(3, 1, 1)
        self.std = torch.tensor(json.loads(meta.get("std", "[0.229, 0.224, 0.225]"))).view(3, 1, 1)
        self.batch_size, self.num_workers, self.cls_only = batch_size, num_workers, cls_only

    @torch.no_grad()
    def embed_batch(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            emb = cls_mean_embedding(self.model, x)
        if self.cls_only:
            emb = emb[:, : emb.shape[1] // 2]
        return emb.float().cpu().numpy()

    def __call__(self, inputs: list[str], skip: Callable[[str], None], *, progress: bool = False,
                 sampling: SlideSampling = SlideSampling(),
                 ) -> tuple[list[str], np.ndarray, list[dict]]:
        """(keys, embeddings float32 [N, 2·dim] or [N, dim] with cls_only, sample JSON) of the
        images that decode; the others go to `skip` with their key and the reason."""
        from tqdm.auto import tqdm

        data = _DecodedBatches(expand_inputs(inputs), self.size, self.mean, self.std,
                               self.batch_size, sampling)
        workers = min(self.num_workers, len(data.inputs), os.cpu_count() or 1)
        loader = DataLoader(data, batch_size=None, num_workers=workers,
                            pin_memory=self.device.type == "cuda")
        keys: list[str] = []
        metas: list[dict] = []
        order: list[tuple[int, int]] = []
        chunks: list[np.ndarray] = []
        with tqdm(desc="embedding", unit="tile", disable=not progress) as bar:
            for batch in loader:
                for line in batch["skipped"]:
                    skip(line)
                if batch["x"] is None:
                    continue
                chunks.append(self.embed_batch(batch["x"]))
                keys += batch["keys"]
                metas += batch["meta"]
                order += batch["order"]
                bar.update(len(batch["keys"]))
        if not chunks:
            return [], np.zeros((0, 0), np.float32), []
        rank = sorted(range(len(keys)), key=order.__getitem__)  # input order, whatever the workers
        return [keys[r] for r in rank], np.concatenate(chunks)[rank], [metas[r] for r in rank]


def embed_inputs(weights: str | Path, inputs: list[str], out: str | Path, *,
                 img_size: int | None = None, batch_size: int = 64, num_workers: int = 0,
                 device: str | None = None, cls_only: bool = False, progress: bool = False,
                 sampling: SlideSampling = SlideSampling(),
                 skipped: list[str] | None = None) -> tuple[int, int]:
    """Embed every input tile with an exported backbone and write ``out``: ``keys``,
    ``embeddings`` float32 and, for shard samples, their ``slide_id``, ``mpp``, ``x``, ``y``
    (empty / NaN / -1 where unknown), as an .npz or, for a ``.parquet`` path, a table with one
    row per tile (``embedding`` a fixed-size list column). Returns (tiles, embedding dimension).
    Unreadable images and shards are skipped and described in ``skipped`` (when given)."""
    if Path(out).suffix not in (".npz", ".parquet"):
        raise ValueError(f"{out}: the output is an .npz or a .parquet file")
    skipped = [] if skipped is None else skipped
    embedder = Embedder(weights, img_size=img_size, batch_size=batch_size,
                        num_workers=num_workers, device=device, cls_only=cls_only)
    keys, emb, metas = embedder(inputs, skipped.append, progress=progress, sampling=sampling)
    columns = {"keys": np.array(keys, dtype=str),
               "slide_id": np.array([str(m.get("slide_id", "")) for m in metas], dtype=str),
               "mpp": np.array([float(m.get("mpp", "nan")) for m in metas], dtype=np.float64),
               "x": np.array([int(m.get("x", -1)) for m in metas], dtype=np.int64),
               "y": np.array([int(m.get("y", -1)) for m in metas], dtype=np.int64)}
    if Path(out).suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = emb.shape[1] if emb.ndim == 2 else 0
        table = pa.table({"key": columns.pop("keys"), **columns,
                          "embedding": pa.FixedSizeListArray.from_arrays(
                              pa.array(emb.reshape(-1), pa.float32()), dim)})
        pq.write_table(table, str(out))
    else:
        np.savez(out, embeddings=emb, **columns)
    return len(keys), emb.shape[1] if emb.ndim == 2 else 0

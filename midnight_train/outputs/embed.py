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
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from midnight_prep.plan import SLIDE_EXTENSIONS
from midnight_prep.shards import read_shard
from midnight_train.data.crops import decode_tile

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
TIFF_SUFFIXES = {".tif", ".tiff"}
# Whole slides by name: every slide format but TIFF, which tile images use too (BACH's, say);
# a local TIFF is opened with OpenSlide first and is a slide when it is a pyramid or too big
# for a tile (`tiff_is_slide`)
SLIDE_SUFFIXES = set(SLIDE_EXTENSIONS) - IMAGE_SUFFIXES
LARGEST_TILE = 8192  # px a side: a single-level TIFF larger than this is a slide
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
              "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class SlideSampling:
    """How whole-slide inputs become tiles: `tiles` per slide at each of `mpps` (µm/px)."""

    mpps: tuple[float, ...] = (0.5,)
    tiles: int = 100
    tile_size: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Input:
    """One input: an image, a .tar shard, a slide, or a TIFF (a slide or an image, decided when
    it is opened); slides of a slide list carry its µm/px override and slide id."""

    path: str
    kind: str  # "image" | "shard" | "slide" | "tiff"
    mpp: float | None = None
    slide_id: str | None = None


@torch.no_grad()
def cls_mean_embedding(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[B, 2 * dim]``: CLS and mean patch token of ``forward_features`` (after the final
    norm). Register tokens are neither CLS nor patches and are left out of the mean."""
    tokens = model.forward_features(images)
    prefix = getattr(model, "num_prefix_tokens", 1)
    return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(dim=1)], dim=-1)


def _kind(path: str) -> str | None:
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return "tiff" if "://" not in path else "image"  # OpenSlide needs a local file
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix == ".tar":
        return "shard"
    return "slide" if suffix in SLIDE_SUFFIXES else None


def expand_inputs(inputs: list[str]) -> list[Input]:
    """Local folders replaced by the images, shards and slides below them (sorted), slide lists
    (.csv: path, slide_id, mpp, as midnight-prep reads them) by their slides; the rest as
    given."""
    from midnight_prep.plan import PlanError, read_slide_list

    out: list[Input] = []
    for item in inputs:
        if "://" not in item and Path(item).is_dir():
            found = (str(p) for p in sorted(Path(item).rglob("*")) if p.is_file())
            out += [Input(p, kind) for p in found if (kind := _kind(p))]
        elif PurePosixPath(item).suffix.lower() == ".csv":
            try:
                rows = read_slide_list(item)
            except PlanError as err:
                raise ValueError(str(err)) from err
            out += [Input(r["path"], "slide", r["mpp"], r["slide_id"]) for r in rows]
        elif kind := _kind(item):
            out.append(Input(item, kind))
        else:
            raise ValueError(f"{item}: not an image, a directory, a .tar shard, a slide list "
                             f"(.csv) or a slide ({', '.join(sorted(SLIDE_SUFFIXES))})")
    return out


def tiff_is_slide(path: str) -> bool:
    """Whether OpenSlide opens this TIFF as a whole slide: a pyramid, or one level larger than
    any tile. A TIFF it cannot open (strips, LZW tiles of an evaluation set) is an image."""
    from midnight_prep.slides import _openslide

    openslide = _openslide()  # SlideError when missing: without it a slide cannot be told apart
    try:
        with openslide.OpenSlide(path) as osr:
            return osr.level_count > 1 or max(osr.dimensions) > LARGEST_TILE
    except openslide.OpenSlideError:  # also "unsupported format"
        return False


def slide_tiles(path: str, sampling: SlideSampling, skip: Callable[[str], None], *,
                mpp: float | None = None, slide_id: str | None = None,
                ) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, JPEG, metadata) of tiles the shard builder cuts from one slide (local, or an URL
    staged as midnight-prep stages it); `mpp` is a slide list's override."""
    from midnight_prep.job import process_slide
    from midnight_prep.plan import BuildParams, SlideSpec, mpp_key
    from midnight_prep.shards import safe_slide_id

    tiles: list[tuple[str, bytes, dict[str, Any]]] = []
    params = BuildParams(mpps=sampling.mpps, tile_size=sampling.tile_size, seed=sampling.seed)
    spec = SlideSpec(path, slide_id or safe_slide_id(PurePosixPath(path).name.split(".")[0]),
                     mpp=mpp, quotas={mpp_key(m): sampling.tiles for m in sampling.mpps})
    report = process_slide(spec, params, lambda key, jpeg, meta: tiles.append((key, jpeg, meta)))
    if report.status != "ok":
        advice = "" if "'mpp' column" not in str(report.error) else \
            " (embed takes a slide list CSV with path,mpp columns, as midnight-prep does)"
        skip(f"{path}: {report.error}{advice}")
    for m, reason in report.skipped_mpps.items():
        skip(f"{path}: no tiles at {m} µm/px ({reason})")
    yield from tiles


def iter_input(item: Input, skip: Callable[[str], None],
               sampling: SlideSampling = SlideSampling(), *, slides: bool = True,
               ) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, encoded image, the sample's JSON or {}) of one input. A shard that cannot be read
    or breaks off, a slide that cannot be read, and, with ``slides=False``, a whole slide, are
    reported to `skip`."""
    kind = item.kind
    if kind == "tiff":
        from midnight_prep.slides import SlideError

        try:
            kind = "slide" if tiff_is_slide(item.path) else "image"
        except SlideError as err:
            skip(f"{item.path}: cannot tell a whole slide from an image: {err}")
            return
    if kind == "slide":
        if not slides:
            skip(f"{item.path}: a whole slide, not a tile image (`embed` tiles slides)")
            return
        yield from slide_tiles(item.path, sampling, skip, mpp=item.mpp, slide_id=item.slide_id)
    elif kind == "shard":
        try:
            for key, files in read_shard(item.path, on_duplicate=skip):
                image = next((files[e] for e in ("jpg", "jpeg", "png") if e in files), None)
                if image is None:
                    skip(f"{item.path}: {key} has no .jpg/.jpeg/.png")
                    continue
                try:
                    meta = json.loads(files["json"]) if "json" in files else {}
                except ValueError:
                    meta = {}
                yield key, image, meta if isinstance(meta, dict) else {}
        except Exception as exn:
            skip(f"{item.path}: unreadable or damaged shard ({exn})")
    else:
        try:
            with fsspec.open(item.path, "rb") as f:
                data = f.read()
        except OSError as exn:
            skip(f"{item.path}: cannot be read ({exn})")
            return
        yield item.path, data, {}


def iter_encoded(inputs: list[str], skip: Callable[[str], None],
                 sampling: SlideSampling = SlideSampling(), *, slides: bool = True,
                 ) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, encoded image, the sample's JSON or {}) from image files, directories of images,
    webdataset .tar shards (local paths or fsspec URLs), slide lists and slides (tiles as
    `sampling` says), as `iter_input` reads each."""
    for item in expand_inputs(inputs):
        yield from iter_input(item, skip, sampling, slides=slides)


def decode_error(exn: Exception) -> str:
    """Why an image did not decode, without PIL's ``<_io.BytesIO object at 0x…>``."""
    if isinstance(exn, UnidentifiedImageError):
        return "not an image format PIL decodes"
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(exn)) or type(exn).__name__


def to_tensor(img: Image.Image, size: int, mean: torch.Tensor, std: torch.Tensor,
              resample: Image.Resampling = Image.Resampling.BICUBIC) -> torch.Tensor:
    """[3, size, size] normalised float: an antialiased PIL resize when the size differs."""
    if img.size != (size, size):
        img = img.resize((size, size), resample)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (x - mean) / std


class _DecodedBatches(IterableDataset):
    """Batches of decoded, resized, normalised tiles; worker w of n takes inputs w, w + n, …"""

    def __init__(self, inputs: list[Input], size: int, mean: torch.Tensor, std: torch.Tensor,
                 batch_size: int, sampling: SlideSampling, resample: Image.Resampling,
                 slides: bool) -> None:
        self.inputs, self.size, self.mean, self.std = inputs, size, mean, std
        self.batch_size, self.sampling = batch_size, sampling
        self.resample, self.slides = resample, slides

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        skipped: list[str] = []
        keys: list[str] = []
        metas: list[dict] = []
        order: list[tuple[int, int]] = []  # (input, sample within it): input order at the end
        tensors: list[torch.Tensor] = []
        done = 0  # inputs finished since the last batch (the progress bar counts inputs)
        for i in range(worker, len(self.inputs), n):
            for j, (key, data, meta) in enumerate(iter_input(self.inputs[i], skipped.append,
                                                             self.sampling, slides=self.slides)):
                try:
                    tensors.append(to_tensor(decode_tile(data), self.size, self.mean, self.std,
                                             self.resample))
                except Exception as exn:
                    skipped.append(f"{key}: not a readable image ({decode_error(exn)})")
                    continue
                keys.append(key)
                metas.append(meta)
                order.append((i, j))
                if len(keys) == self.batch_size:
                    yield {"keys": keys, "x": torch.stack(tensors), "meta": metas,
                           "order": order, "skipped": skipped, "done": done}
                    keys, metas, order, tensors, skipped, done = [], [], [], [], [], 0
            done += 1
        if keys or skipped or done:
            yield {"keys": keys, "x": torch.stack(tensors) if tensors else None, "meta": metas,
                   "order": order, "skipped": skipped, "done": done}


class Embedder:
    """An exported backbone with its preprocessing (input size, mean/std, interpolation from
    the export's config.json): images in, CLS+Mean embeddings out, in batches. ``slides``:
    whole slides are tiled (else skipped, for labelled tile sets)."""

    def __init__(self, weights: str | Path, *, img_size: int | None = None, batch_size: int = 64,
                 num_workers: int = 0, device: str | None = None, cls_only: bool = False,
                 slides: bool = True) -> None:
        from midnight_train.outputs.export import (
            ExportError,
            check_img_size,
            load_exported,
            read_export_spec,
        )

        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch size {batch_size} must be ≥ 1 and workers {num_workers} ≥ 0")
        spec = read_export_spec(weights)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_exported(weights, spec=spec)
        self.size = img_size or spec.img_size
        source = Path(weights) / "config.json" if Path(weights).is_dir() else weights
        try:
            check_img_size(self.size, model.patch_embed.patch_size[0],
                           "--img-size" if img_size else f"{source}: the input size")
        except ValueError as err:  # an export's own size is the export's fault, not an option's
            raise (err if img_size else ExportError(str(err))) from None
        self.model = model.to(self.device)
        self.mean = torch.tensor(spec.mean).view(3, 1, 1)
        self.std = torch.tensor(spec.std).view(3, 1, 1)
        self.resample = RESAMPLING[spec.interpolation]
        self.batch_size, self.num_workers, self.cls_only = batch_size, num_workers, cls_only
        self.slides = slides

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
                               self.batch_size, sampling, self.resample, self.slides)
        workers = min(self.num_workers, len(data.inputs), os.cpu_count() or 1)
        loader = DataLoader(data, batch_size=None, num_workers=workers,
                            pin_memory=self.device.type == "cuda")
        keys: list[str] = []
        metas: list[dict] = []
        order: list[tuple[int, int]] = []
        chunks: list[np.ndarray] = []
        with tqdm(desc="embedding", total=len(data.inputs), unit="input",
                  disable=not progress) as bar:
            for batch in loader:
                for line in batch["skipped"]:
                    skip(line)
                if batch["x"] is not None:
                    chunks.append(self.embed_batch(batch["x"]))
                    keys += batch["keys"]
                    metas += batch["meta"]
                    order += batch["order"]
                bar.update(batch["done"])
                bar.set_postfix(tiles=len(keys), refresh=False)
        if not chunks:
            return [], np.zeros((0, 0), np.float32), []
        rank = sorted(range(len(keys)), key=order.__getitem__)  # input order, whatever the workers
        return [keys[r] for r in rank], np.concatenate(chunks)[rank], [metas[r] for r in rank]


def check_output(out: str | Path) -> Path:
    """An .npz or .parquet path in an existing folder: checked before any work is done."""
    out = Path(out)
    if out.suffix not in (".npz", ".parquet"):
        raise ValueError(f"{out}: the output is an .npz or a .parquet file")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; give a file name ending in .npz or .parquet")
    if not out.parent.is_dir():
        raise ValueError(f"{out}: the folder {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"{out}: the folder {out.parent} is not writable")
    return out


def embed_inputs(weights: str | Path, inputs: list[str], out: str | Path, *,
                 img_size: int | None = None, batch_size: int = 64, num_workers: int = 0,
                 device: str | None = None, cls_only: bool = False, progress: bool = False,
                 sampling: SlideSampling = SlideSampling(),
                 skipped: list[str] | None = None) -> tuple[int, int]:
    """Embed every input tile with an exported backbone and write ``out``: ``keys``,
    ``embeddings`` float32 and, for shard samples, their ``slide_id``, ``mpp``, ``x``, ``y``
    (empty / NaN / -1 where unknown), as an .npz or, for a ``.parquet`` path, a table with one
    row per tile (``embedding`` a fixed-size list column). Returns (tiles, embedding dimension).
    Unreadable images and shards are skipped and described in ``skipped`` (when given). With
    no tile at all nothing is written; ``out`` is replaced at once (a temporary file renamed),
    so an earlier file there survives any failure."""
    out = check_output(out)
    skipped = [] if skipped is None else skipped
    expand_inputs(inputs)  # a bad input named before the model is loaded
    embedder = Embedder(weights, img_size=img_size, batch_size=batch_size,
                        num_workers=num_workers, device=device, cls_only=cls_only)
    keys, emb, metas = embedder(inputs, skipped.append, progress=progress, sampling=sampling)
    if not keys:
        return 0, 0
    columns = {"keys": np.array(keys, dtype=str),
               "slide_id": np.array([str(m.get("slide_id", "")) for m in metas], dtype=str),
               "mpp": np.array([float(m.get("mpp", "nan")) for m in metas], dtype=np.float64),
               "x": np.array([int(m.get("x", -1)) for m in metas], dtype=np.int64),
               "y": np.array([int(m.get("y", -1)) for m in metas], dtype=np.int64)}
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if out.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"key": columns.pop("keys"), **columns,
                              "embedding": pa.FixedSizeListArray.from_arrays(
                                  pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])})
            pq.write_table(table, str(tmp))
        else:
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=emb, **columns)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(keys), emb.shape[1]

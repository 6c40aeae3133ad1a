"""Test helper: write small shards in the shard format (ARCHITECTURE.md, "Sample") from real tissue.

Tiles are cut from the real CC0 CMU-1-Small-Region slide (read once with OpenSlide), encoded as
RGB JPEG q90 4:2:0 and written as `KEY.jpg` + `KEY.json` tar members. Helpers to damage shards
(corrupt JPEG, missing member, truncated tar) live here too so tests can build realistic faults.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import openslide

from midnight_prep.job import encode_jpeg
from midnight_prep.shards import JPEG_QUALITY, manifest_name, read_shard, sample_key

MPP = 0.499  # the CMU slide's level-0 µm/px


@functools.lru_cache(maxsize=2)
def _slide_rgb(slide_path: str) -> np.ndarray:
    slide = openslide.OpenSlide(slide_path)
    try:
        region = slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")
    finally:
        slide.close()
    return np.asarray(region)


def tissue_positions(slide_path: str | Path, n: int, size: int, seed: int = 0) -> list[tuple[int, int]]:
    """n distinct top-left corners of size x size tiles that are mostly tissue (not white glass)."""
    rgb = _slide_rgb(str(slide_path))
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int]] = []
    seen = set()
    for _ in range(200 * n):
        x = int(rng.integers(0, rgb.shape[1] - size))
        y = int(rng.integers(0, rgb.shape[0] - size))
        if (x, y) in seen:
            continue
        tile = rgb[y : y + size, x : x + size]
        if (tile.min(axis=2) < 200).mean() >= 0.6:
            seen.add((x, y))
            out.append((x, y))
            if len(out) == n:
                return out
    raise RuntimeError(f"found only {len(out)} tissue tiles of {size} px")


def tissue_tiles(slide_path: str | Path, n: int, size: int = 112, seed: int = 0) -> list[np.ndarray]:
    rgb = _slide_rgb(str(slide_path))
    return [rgb[y : y + size, x : x + size].copy() for x, y in tissue_positions(slide_path, n, size, seed)]


def sample_members(key: str, tile: np.ndarray, x: int, y: int, group: str, slide_id: str = "cmu1") -> dict[str, bytes]:
    size = tile.shape[0]
    meta = {
        "slide_id": slide_id, "source": "CMU-1-Small-Region.svs", "mpp": MPP, "x": x, "y": y,
        "extent": size, "level": 0, "read_size": size, "tile_size": size, "foreground": 1.0,
        "hsv_fraction": 1.0, "group": group, "seed": 0,
    }
    return {"jpg": encode_jpeg(tile, JPEG_QUALITY), "json": json.dumps(meta).encode()}


def write_tar(path: str | Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """Write samples [(key, {ext: bytes})] as a webdataset tar with fixed mtime and order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return path


def make_shards(
    out_dir: str | Path,
    slide_path: str | Path,
    *,
    n_shards: int,
    per_shard: int,
    tile_size: int = 112,
    group: str = "cmu",
    prefix: str = "shard",
    seed: int = 0,
) -> list[Path]:
    """n_shards shards of per_shard distinct real tissue tiles each; keys are globally unique."""
    n = n_shards * per_shard
    positions = tissue_positions(slide_path, n, tile_size, seed)
    rgb = _slide_rgb(str(slide_path))
    paths = []
    for s in range(n_shards):
        samples = []
        for x, y in positions[s * per_shard : (s + 1) * per_shard]:
            tile = rgb[y : y + tile_size, x : x + tile_size]
            key = sample_key(group, MPP, x, y)
            samples.append((key, sample_members(key, tile, x, y, group)))
        paths.append(write_tar(Path(out_dir) / f"{prefix}-{s:06d}.tar", samples))
    return paths


def write_manifest(out_dir: str | Path, job: int, shard_paths: list[Path], samples: list[int]) -> Path:
    """A per-job manifest as the shard builder writes it (OUTPUT/manifests/job-NNNNNN.json)."""
    out_dir = Path(out_dir)
    entries = [
        {"name": p.relative_to(out_dir).as_posix(), "samples": n, "bytes": p.stat().st_size}
        for p, n in zip(shard_paths, samples, strict=True)
    ]
    job_id = f"job-{job:06d}"
    path = out_dir / manifest_name(job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"job_id": job_id, "shards": entries, "samples": sum(samples)}))
    return path


def read_tar(path: str | Path) -> list[tuple[str, dict[str, bytes]]]:
    """Samples of a tar, in order (for building damaged copies)."""
    return list(read_shard(str(path)))


def magnification_classes(root: str | Path, slide_path: str | Path, n_train: int, n_test: int,
                          size: int, seed: int = 0) -> Path:
    """Labelled real tissue in class folders root/{train,test}/{fine,coarse}/i.png: the centre
    half of a tile (full resolution) and the whole tile 2x coarser, both size/2 px."""
    from PIL import Image

    root = Path(root)
    tiles = tissue_tiles(slide_path, n_train + n_test, size=size, seed=seed)
    q, half = size // 4, size // 2
    for split, part in (("train", tiles[:n_train]), ("test", tiles[n_train:])):
        for i, tile in enumerate(part):
            for label, img in (("fine", Image.fromarray(tile[q:q + half, q:q + half])),
                               ("coarse", Image.fromarray(tile).resize((half, half), Image.Resampling.BOX))):
                (root / split / label).mkdir(parents=True, exist_ok=True)
                img.save(root / split / label / f"{i}.png")
    return root


def truncate(path: str | Path, keep_fraction: float) -> Path:
    """Cut a shard file short in the middle of a member, as an interrupted upload would."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction) + 100])
    return path


def shard_contents(out: str | Path) -> dict[str, tuple[str, list[str]]]:
    """An output's shards: name -> (sha256, sample keys in order)."""
    found = {}
    for p in sorted((Path(out) / "shards").glob("*.tar")):
        with tarfile.open(p) as tar:
            keys = [m.name.rsplit(".", 1)[0] for m in tar.getmembers() if m.name.endswith(".jpg")]
        found[p.name] = (hashlib.sha256(p.read_bytes()).hexdigest(), keys)
    return found

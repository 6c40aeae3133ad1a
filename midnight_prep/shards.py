"""Shard format (DESIGN.md §2): keys, JSON metadata, deterministic tar writing, and publishing
files atomically to a local path or any fsspec URL (s3://, gs://, file://)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

import fsspec

# The contract with the trainer and with outside checks: every sample's JSON has these fields.
META_FIELDS = ("slide_id", "source", "mpp", "x", "y", "extent", "level", "read_size",
               "tile_size", "foreground", "hsv_fraction", "group", "seed")
JPEG_QUALITY = 90
SHARD_DIR = "shards"
MANIFEST_DIR = "manifests"
PLAN_NAME = "plan.json"


def safe_slide_id(text: str) -> str:
    """A dot-free, path-safe id: webdataset cuts keys at the first dot (TCGA names have dots)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")
    return cleaned or "slide"


def sample_key(slide_id: str, mpp: float, x: int, y: int) -> str:
    return f"{slide_id}_{round(mpp * 1000):05d}_{x:07d}_{y:07d}"


def shard_name(job_id: str, index: int) -> str:
    return f"{SHARD_DIR}/{job_id}-{index:04d}.tar"


def manifest_name(job_id: str) -> str:
    return f"{MANIFEST_DIR}/{job_id}.json"


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uname = info.gname = "midnight"
    return info


def write_tar(samples, fileobj) -> int:
    """Write (key, jpeg bytes, meta dict) samples as a webdataset tar (KEY.jpg then KEY.json) with
    fixed member metadata, so the same samples give byte-identical shards. Plain ``tarfile``
    (what webdataset's writer wraps) keeps the prep tool free of webdataset's torch import.
    Returns the sample count."""
    n = 0
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, jpeg, meta in samples:
            text = json.dumps(meta, sort_keys=True).encode()
            tar.addfile(_member(f"{key}.jpg", len(jpeg)), io.BytesIO(jpeg))
            tar.addfile(_member(f"{key}.json", len(text)), io.BytesIO(text))
            n += 1
    return n


def publish(local_file: str, url: str) -> None:
    """Move a finished local file to ``url`` so that readers never see it half-written: a rename
    within the target directory locally, a single PUT (atomic) on object storage."""
    if is_local(url):
        target = Path(local_path(url))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.partial")
        with open(local_file, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
        return
    fs, path = fsspec.core.url_to_fs(url)
    fs.put_file(local_file, path)


def publish_bytes(data: bytes, url: str) -> None:
    with tempfile.NamedTemporaryFile(prefix="midnight-", delete=False) as tmp:
        tmp.write(data)
    try:
        publish(tmp.name, url)
    finally:
        os.unlink(tmp.name)


def read_json(url: str):
    with fsspec.open(url, "rb") as f:
        return json.loads(f.read())


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def list_manifests(output: str) -> dict[str, dict]:
    """job_id -> manifest for every finished job under ``output``."""
    fs, path = fsspec.core.url_to_fs(join(output, MANIFEST_DIR))
    if not fs.exists(path):
        return {}
    found = {}
    for name in sorted(fs.ls(path, detail=False)):
        if name.endswith(".json"):
            with fs.open(name, "rb") as f:
                manifest = json.loads(f.read())
            found[manifest["job_id"]] = manifest
    return found


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def iter_shard(url: str):
    """Yield (key, jpeg bytes, meta) of a shard (local path or fsspec URL)."""
    with fsspec.open(url, "rb") as f:
        data = f.read()
    pending: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
            if {"jpg", "json"} <= pending[key].keys():
                entry = pending.pop(key)
                yield key, entry["jpg"], json.loads(entry["json"])

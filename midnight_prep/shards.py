"""The shard format's single definition (the contract is in ARCHITECTURE.md): sample keys, JSON
metadata fields, deterministic tar writing, the one streaming reader, and publishing files
atomically (or exclusively) to a local path or any fsspec URL (s3://, gs://, file://).

Output layout: OUT/plan.json, OUT/shards/JOB-KKKK.tar, OUT/manifests/JOB.json (the commit marker
of a job, written last), OUT/locks/JOB.lock (while a builder works on the job)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import tempfile
import unicodedata
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import fsspec

from . import storage

# The contract with the trainer and with outside checks: every sample's JSON has these fields.
META_FIELDS = ("slide_id", "source", "mpp", "x", "y", "extent", "level", "read_size",
               "tile_size", "foreground", "hsv_fraction", "group", "seed")
JPEG_QUALITY = 90
SHARD_DIR = "shards"
MANIFEST_DIR = "manifests"
PLAN_NAME = "plan.json"


def safe_slide_id(text: str) -> str:
    """A dot-free, path-safe ASCII id: webdataset cuts keys at the first dot (TCGA names have
    dots). Accents are dropped (é -> e); a name with no ASCII letter or digit at all gets a
    stable id from its hash (`slide-` and 10 hex digits), so such names stay apart."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", plain).strip("-")
    return cleaned or "slide-" + hashlib.sha256(text.encode()).hexdigest()[:10]


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


def canonical(url: str) -> str:
    """One spelling per place: an absolute local path (``./out``, ``out/``, ``file:///x/out``
    alike), or the URL without a trailing slash."""
    if is_local(url):
        return os.path.abspath(local_path(url))
    return url.rstrip("/")


def folder_of(url: str) -> str:
    """The folder holding the file ``url``, canonical."""
    return canonical(url).rsplit("/", 1)[0] or "/"


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


def _partial(target: Path) -> tuple[int, str]:
    """A temporary file next to ``target``, named for it and unique to this writer, so that
    concurrent writers never share one: `.NAME.RANDOM.partial`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make a shared output unreadable
    return fd, tmp


def _umask() -> int:
    """This process's umask, read without changing it where Linux tells it (os.umask sets it,
    a race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish(local_file: str, url: str) -> None:
    """Move a finished local file to ``url`` so that readers never see it half-written: a rename
    within the target directory locally; on object storage one PUT (atomic), retried on
    transient errors for up to `storage.retry_budget()` and checked by the stored size."""
    if is_local(url):
        target = Path(local_path(url))
        fd, tmp = _partial(target)
        try:
            with open(local_file, "rb") as src, os.fdopen(fd, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path = fsspec.core.url_to_fs(url)
    size = os.path.getsize(local_file)

    def put() -> None:
        fs.put_file(local_file, path)
        fs.invalidate_cache(path)
        stored = int(fs.info(path)["size"])
        if stored != size:
            raise storage.IncompleteUpload(f"{url} holds {stored} bytes after the upload, not {size}")

    try:
        storage.retrying(put, url, "write")
    except Exception:
        # A failed upload leaves nothing (a large one's parts are aborted by s3fs): remove what
        # a wrong-size try may have stored, if the server lets us.
        try:
            fs.rm_file(path)
        except Exception:
            pass
        raise


def publish_bytes(data: bytes, url: str) -> None:
    with tempfile.NamedTemporaryFile(prefix="midnight-", delete=False) as tmp:
        tmp.write(data)
    try:
        publish(tmp.name, url)
    finally:
        os.unlink(tmp.name)


class Uploads:
    """Publish a job's finished files in the background, a few at once, while the next is being
    written: object stores take parallel PUTs far faster than one after another. Each local
    file is deleted once stored; at most `PENDING` wait, so local disk stays bounded. Leaving
    the ``with`` block waits for all and raises the first failure (so the manifest, written
    after it, only ever follows shards that are all stored)."""

    THREADS = 4
    PENDING = 8

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(self.THREADS, thread_name_prefix="upload")
        self._pending: deque[Future] = deque()

    def put(self, local_file: str, url: str) -> None:
        failed = next((f for f in self._pending if f.done() and f.exception() is not None), None)
        if failed is not None:  # stop writing shards that could not be stored anyway
            failed.result()
        while len(self._pending) >= self.PENDING:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._publish, local_file, url))

    @staticmethod
    def _publish(local_file: str, url: str) -> None:
        publish(local_file, url)
        os.unlink(local_file)

    def __enter__(self) -> Uploads:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        error = exc
        for future in self._pending:
            if error is not None:
                break
            try:
                future.result()
            except Exception as e:
                error = e
        # After a failure, uploads not started are dropped; running ones end within their budget.
        self._pool.shutdown(wait=True, cancel_futures=error is not None)
        if exc is None and error is not None:
            raise error


def create_new(data: bytes, url: str) -> None:
    """Write ``data`` to ``url`` only when nothing is there yet (FileExistsError otherwise): of
    two writers exactly one wins, and a reader sees all of it or nothing. Locally a hard link of
    a finished temporary file (atomic, also on NFS); on object storage a conditional PUT
    (If-None-Match: *) where the store supports it, see `locks` for the others."""
    if not is_local(url):
        fs, path = fsspec.core.url_to_fs(url)

        def put() -> None:
            try:
                fs.pipe_file(path, data, mode="create")
            except OSError as e:
                # s3fs maps the refusal to FileExistsError only when the server names the
                # condition (AWS does, SeaweedFS and others do not); ours is the only one sent.
                cause = getattr(e.__cause__, "response", None) or {}
                if cause.get("Error", {}).get("Code") == "PreconditionFailed":
                    raise FileExistsError(f"{url} exists") from e
                raise
        # A try whose reply was lost may have landed: the next then finds the file there
        # (FileExistsError); callers that care compare its content with theirs (`locks`).
        storage.retrying(put, url, "write")
        return
    target = Path(local_path(url))
    fd, tmp = _partial(target)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, target)
    finally:
        os.unlink(tmp)


def remove_partials(output: str, job_id: str) -> None:
    """Delete the temporary files a killed writer of job ``job_id`` left in a local output (call
    it holding the job's lock: no one else writes them then). Object stores have none."""
    if not is_local(output):
        return
    base = Path(local_path(output))
    for pattern in (f"{SHARD_DIR}/.{job_id}-*.partial", f"{MANIFEST_DIR}/.{job_id}.json.*.partial"):
        for leftover in base.glob(pattern):
            leftover.unlink(missing_ok=True)


def retried(action: Callable, url: str, doing: str):
    """``action()``, retried on transient errors when ``url`` is remote (see `storage.retrying`)."""
    return action() if is_local(url) else storage.retrying(action, url, doing)


def read_json(url: str):
    def read():
        with fsspec.open(url, "rb") as f:
            return json.loads(f.read())
    return retried(read, url, "read")


def exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return retried(lambda: fs.exists(path), url, "read")


def remove(url: str) -> None:
    """Delete ``url``; nothing to do when it does not exist."""
    fs, path = fsspec.core.url_to_fs(url)

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
    retried(rm, url, "delete")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class ShardOpenError(OSError):
    """A shard that cannot be opened at all (missing, no permission, storage unreachable)."""


def read_shard(url: str, on_duplicate: Callable[[str], None] | None = None,
               ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream the samples of a shard (local path or fsspec URL) as (key, {extension: bytes}), in
    tar order, without holding the shard in memory. This is the one reader of the format.

    A sample is a run of consecutive members whose names share the part before the first dot
    of the file name (the webdataset convention: `a/b.c.d` has key `a/b`, extension `c.d`).
    A member that repeats an extension of its sample is dropped and reported to `on_duplicate`
    (or raises ValueError without one). Raises ShardOpenError when the shard cannot be opened;
    any other exception mid-way means damage (a truncated or corrupt tar), after the samples
    before it were yielded."""
    try:
        handle = fsspec.open(url, "rb").open()
    except Exception as exn:
        raise ShardOpenError(f"{url}: {exn}") from exn
    key: str | None = None
    files: dict[str, bytes] = {}
    with handle, tarfile.open(fileobj=handle, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, _, ext = name.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            data = tar.extractfile(member).read()
            if member_key != key:
                if key is not None:
                    yield key, files
                key, files = member_key, {}
            if ext in files:
                message = f"{url}: {member.name} repeats a member of sample {key}"
                if on_duplicate is None:
                    raise ValueError(message)
                on_duplicate(message)
                continue
            files[ext] = data
    if key is not None:
        yield key, files


def iter_tiles(url: str) -> Iterator[tuple[str, bytes, dict]]:
    """(key, JPEG bytes, metadata) of each complete sample of a shard built by this tool."""
    for key, files in read_shard(url):
        if "jpg" in files and "json" in files:
            yield key, files["jpg"], json.loads(files["json"])

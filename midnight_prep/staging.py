"""Slides on object storage, staged onto local disk for OpenSlide (which reads local files only):
a bounded cache shared by every process of a machine that uses the same folder (pool workers,
several builders, the trainer's data workers).

    cache = SlideCache()                      # default folder and size limit, see below
    with cache.open_local("s3://bucket/a.svs") as path:
        Slide(path) ...                       # the file stays while it is held
    held = cache.acquire(url); ...; held.release()   # the same, for longer-lived holders

Local paths pass through untouched. A remote slide is looked at on the store at every acquire
(size and ETag / last-modified of each of its files): an entry is the copy of that version at
that endpoint (`entry_key`), so a replaced object is fetched anew and a copy is never served
without a successful look (credentials refused, store down past the retries: StagingError). It
is downloaded into a temporary folder and renamed into place once complete (sizes checked), so
a reader never sees part of one. Entries
are guarded by file locks (`fcntl.flock`, one lock file per entry): holders keep a shared lock,
so a file in use is never deleted; a downloader holds it exclusively, so concurrent processes
wait for one copy instead of fetching their own. Unused entries are evicted least recently used
first to stay under `max_bytes`; when everything is in use, an acquirer waits for room.

Folder layout (ROOT): `cache.lock` (held briefly while space is counted), `KEY.lock`, `KEY/`
(a complete entry: `entry.json` plus the slide under its own file name, and for MIRAX `.mrxs`
its sibling data folder), `KEY.partial/` (a download in progress; its `entry.json` reserves the
space). A killed downloader's partial folder is removed by the next process that counts space."""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import fsspec

from .shards import is_local, local_path
from .storage import StorageError, backoff, endpoint_of, etag_of, is_transient, storage_message

log = logging.getLogger(__name__)

# Options of the command line (midnight-prep --stage-dir / --stage-max-gb) reach pool workers
# and other engines' tasks through these environment variables.
ENV_DIR = "MIDNIGHT_STAGE_DIR"
ENV_MAX_GB = "MIDNIGHT_STAGE_MAX_GB"
DEFAULT_MAX_BYTES = 50 * 10**9  # at most; also at most half the free disk (see default_max_bytes)
ENTRY_FILE = "entry.json"
# Formats whose slide is several files found by names inside them; .mrxs (one file and a folder
# of the same stem) is staged whole.
REFUSED = {".vms": "Hamamatsu .vms slides are several files that OpenSlide reads together"}


class StagingError(StorageError):
    """A slide that cannot be staged: missing or refused object, storage down past the retry
    budget, a slide larger than the cache, or no room freed in time. The message is one
    paragraph for the user."""


def default_root() -> str:
    """The cache folder: $MIDNIGHT_STAGE_DIR, else one per user in the temporary directory."""
    return os.environ.get(ENV_DIR) or os.path.join(tempfile.gettempdir(),
                                                   f"midnight-slide-cache-{os.getuid()}")


def configure(root: str | None = None, max_gb: float | None = None) -> None:
    """Set the default cache folder and limit of this process and the workers it starts later."""
    if root is not None:
        os.environ[ENV_DIR] = os.path.abspath(root)
    if max_gb is not None:
        os.environ[ENV_MAX_GB] = str(max_gb)


def default_max_bytes(root: str) -> int:
    """$MIDNIGHT_STAGE_MAX_GB, else 50 GB or half the free space where ``root`` is, if less."""
    if os.environ.get(ENV_MAX_GB):
        return int(float(os.environ[ENV_MAX_GB]) * 1e9)
    os.makedirs(root, exist_ok=True)
    return min(DEFAULT_MAX_BYTES, shutil.disk_usage(root).free // 2)


def entry_key(url: str, version: str = "") -> str:
    """The entry name of ``url`` as found on the store: a hash of the URL (no clash between
    same-named slides) and of ``version`` (`_version`: the endpoint and each file's size and
    ETag/last-modified), so a replaced object or another server's never matches an old copy."""
    return hashlib.sha256(f"{url}\0{version}".encode()).hexdigest()[:24]


class Staged:
    """A held slide: ``path`` is a local file that stays until ``release()`` (or the end of a
    ``with`` block). Holding it keeps it from eviction in every process."""

    def __init__(self, url: str, path: str, release=None, size: int | None = None,
                 etag: str | None = None) -> None:
        self.url, self.path, self._release = url, path, release
        # The remote slide file's bytes and ETag as the store gave them when staged (None for
        # a local path), for checks against a plan's record of the file.
        self.size, self.etag = size, etag

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class SlideCache:
    """A bounded local copy of remote slides under ``root`` (created on first use).

    ``max_bytes``: the most all complete and in-progress entries may take together (default
    `default_max_bytes`). ``retry_s``: how long transient storage errors (server down,
    connection reset, 5xx, throttling) are retried with backoff. ``wait_s``: how long to wait
    for room while other holders use the whole cache. ``keep``: False (the builder) removes a
    slide on release when no one else holds it; True (the trainer) leaves it for reuse until it
    is evicted."""

    def __init__(self, root: str | None = None, max_bytes: int | None = None,
                 retry_s: float = 120.0, wait_s: float = 1800.0, keep: bool = True) -> None:
        self.root = os.path.abspath(root or default_root())
        self._max_bytes = max_bytes
        self.retry_s, self.wait_s, self.keep = retry_s, wait_s, keep
        self._held: dict[str, int] = {}  # key -> bytes, entries this process holds (any thread)
        self._mutex = threading.Lock()

    @property
    def max_bytes(self) -> int:
        if self._max_bytes is None:
            self._max_bytes = default_max_bytes(self.root)
        return self._max_bytes

    # ------------------------------------------------------------------ public API

    @contextmanager
    def open_local(self, url: str, keep: bool | None = None) -> Iterator[str]:
        """The local path of ``url`` while inside (a local path is given back as it is)."""
        with self.acquire(url, keep) as held:
            yield held.path

    def acquire(self, url: str, keep: bool | None = None) -> Staged:
        """Stage ``url`` (or find it staged) and hold it until ``release()``; raises
        StagingError when that is not possible."""
        if is_local(url):
            return Staged(url, local_path(url))
        keep = self.keep if keep is None else keep
        name = posixpath.basename(url.rstrip("/"))
        suffix = posixpath.splitext(name)[1].lower()
        if suffix in REFUSED:
            raise StagingError(f"cannot stage {url}: {REFUSED[suffix]}; copy it to local disk "
                               "and give that path instead")
        os.makedirs(self.root, exist_ok=True)
        # The remote look comes first, every time: which version is there now decides the entry.
        files, etag = self._retrying(url, lambda: _remote_files(url, name))
        key = entry_key(url, _version(url, files))
        entry = os.path.join(self.root, key)
        deadline = time.monotonic() + self.wait_s

        def complete() -> bool:  # a folder without ENTRY_FILE is a half-removed entry
            return os.path.isfile(os.path.join(entry, ENTRY_FILE))

        while True:
            fd = self._lock_entry(key, fcntl.LOCK_SH)
            if fd is None:
                continue  # the lock file was replaced meanwhile
            try:
                if not complete():
                    # Become its downloader (others wait on the exclusive lock for our copy).
                    # flock converts by unlocking first, so the entry is looked for again.
                    if not self._relock(fd, key, fcntl.LOCK_EX):
                        os.close(fd)
                        continue
                    if not complete():
                        # What a process killed while removing this entry left behind.
                        shutil.rmtree(entry, ignore_errors=True)
                        try:
                            self._download(url, key, files, deadline)
                        except BaseException:
                            os.unlink(self._lock_path(key))  # no entry: leave no lock file
                            raise
                    if not self._relock(fd, key, fcntl.LOCK_SH) or not complete():
                        os.close(fd)
                        continue
                with open(os.path.join(entry, ENTRY_FILE)) as f:
                    size = json.load(f)["bytes"]
                os.utime(os.path.join(entry, ENTRY_FILE))  # most recently used
            except BaseException:
                os.close(fd)
                raise
            with self._mutex:
                self._held[key] = self._held.get(key, 0) + size
            return Staged(url, os.path.join(entry, name),
                          functools.partial(self._release, key, fd, size, keep),
                          files[0][2], etag)

    def clean(self) -> int:
        """Remove every entry no process holds (and stale partial downloads); return the bytes
        freed."""
        if not os.path.isdir(self.root):
            return 0
        with self._global_lock():
            freed = 0
            for key, _, size in self._entries():
                if self._evict(key):
                    freed += size
            return freed

    def used_bytes(self) -> int:
        """Bytes of complete entries and reserved by downloads in progress."""
        if not os.path.isdir(self.root):
            return 0
        return sum(size for _, _, size in self._entries()) + sum(self._partials().values())

    # ------------------------------------------------------------------ locks

    def _lock_path(self, key: str) -> str:
        return os.path.join(self.root, key + ".lock")

    def _lock_entry(self, key: str, mode: int) -> int | None:
        """An open lock file of ``key`` locked with ``mode``; None if it was deleted (by an
        evictor) while we waited, then the caller tries again."""
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT, 0o644)
        if self._relock(fd, key, mode):
            return fd
        os.close(fd)
        return None

    def _relock(self, fd: int, key: str, mode: int) -> bool:
        """Lock ``fd`` with ``mode`` (blocking); False when its file is no longer ``key``'s
        lock file (an evictor unlinks it under an exclusive lock)."""
        fcntl.flock(fd, mode)
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self._lock_path(key)))
        except FileNotFoundError:
            return False

    @contextmanager
    def _global_lock(self):
        fd = os.open(os.path.join(self.root, "cache.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _try_exclusive(self, key: str, create: bool = False) -> int | None:
        """``key``'s lock file locked exclusively if no one holds it, else None (also when it
        does not exist, unless ``create``)."""
        try:
            fd = os.open(self._lock_path(key), os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(self._lock_path(key))):
                return fd
        except (BlockingIOError, FileNotFoundError):
            pass
        os.close(fd)
        return None

    # ------------------------------------------------------------------ entries

    def _entries(self) -> list[tuple[str, float, int]]:
        """(key, last use, bytes) of the complete entries."""
        found = []
        for key in os.listdir(self.root):
            if key.endswith(".partial"):
                continue
            meta = os.path.join(self.root, key, ENTRY_FILE)
            try:
                with open(meta) as f:
                    size = json.load(f)["bytes"]
                found.append((key, os.stat(meta).st_mtime, size))
            except (OSError, ValueError, KeyError):
                continue  # not an entry, or removed meanwhile
        return found

    def _partials(self) -> dict[str, int]:
        """key -> bytes reserved by downloads in progress; a partial folder whose downloader is
        gone (its entry is not locked) is removed."""
        reserved = {}
        for name in os.listdir(self.root):
            if not name.endswith(".partial"):
                continue
            key = name[: -len(".partial")]
            # A downloader holds its lock file while its partial folder exists: a free (or
            # missing) one means a killed downloader.
            fd = self._try_exclusive(key, create=True)
            if fd is not None:  # no downloader: a leftover of a killed process
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
                if not os.path.isdir(os.path.join(self.root, key)):
                    os.unlink(self._lock_path(key))
                os.close(fd)
                continue
            try:
                with open(os.path.join(self.root, name, ENTRY_FILE)) as f:
                    reserved[key] = json.load(f)["bytes"]
            except (OSError, ValueError, KeyError):
                continue  # being created (its downloader holds the global lock then: not here)
        return reserved

    def _evict(self, key: str) -> bool:
        """Remove entry ``key`` if no one holds it (then its lock file too)."""
        fd = self._try_exclusive(key)
        if fd is None:
            return False
        try:
            shutil.rmtree(os.path.join(self.root, key), ignore_errors=True)
            os.unlink(self._lock_path(key))
        finally:
            os.close(fd)
        return True

    def _release(self, key: str, fd: int, size: int, keep: bool) -> None:
        with self._mutex:
            self._held[key] -= size
            if self._held[key] <= 0:
                del self._held[key]
        try:
            if not keep:
                # Remove the copy unless another holder still uses it (then the exclusive lock
                # fails and that holder decides).
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return
                if os.path.samestat(os.fstat(fd), os.stat(self._lock_path(key))):  # still ours
                    shutil.rmtree(os.path.join(self.root, key), ignore_errors=True)
                    os.unlink(self._lock_path(key))
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ downloads

    def _download(self, url: str, key: str, files: list[tuple[str, str, int, str]],
                  deadline: float) -> None:
        """Fetch ``files`` of ``url`` into ``KEY.partial/`` (space reserved first), check sizes,
        then rename it to ``KEY/``. Called holding ``key``'s lock exclusively."""
        size = sum(n for _, _, n, _ in files)
        if size > self.max_bytes:
            raise StagingError(
                f"cannot stage {url}: it is {_gb(size)}, more than the slide cache's limit of "
                f"{_gb(self.max_bytes)} (in {self.root}); raise --stage-max-gb "
                f"(${ENV_MAX_GB}) or use a --stage-dir with more room")
        partial = os.path.join(self.root, key + ".partial")
        self._reserve(url, key, partial, size, deadline)
        try:
            self._retrying(url, lambda: _fetch(url, files, partial))
            with self._global_lock():
                os.rename(partial, os.path.join(self.root, key))
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise

    def _reserve(self, url: str, key: str, partial: str, size: int, deadline: float) -> None:
        """Make room for ``size`` bytes (evicting unused entries, least recently used first, or
        waiting for holders to release theirs) and reserve it with ``partial``'s entry.json."""
        while True:
            with self._global_lock():
                entries = sorted(self._entries(), key=lambda e: e[1])
                used = sum(s for _, _, s in entries) + sum(self._partials().values())
                for other, _, other_size in entries:
                    if used + size <= self.max_bytes:
                        break
                    if self._evict(other):
                        used -= other_size
                if used + size <= self.max_bytes:
                    shutil.rmtree(partial, ignore_errors=True)
                    os.makedirs(partial)
                    with open(os.path.join(partial, ENTRY_FILE), "w") as f:
                        json.dump({"url": url, "bytes": size}, f)
                    return
            with self._mutex:
                mine = sum(self._held.values())
            if mine + size > self.max_bytes:
                raise StagingError(
                    f"cannot stage {url} ({_gb(size)}): this process already holds "
                    f"{_gb(mine)} of the slide cache's {_gb(self.max_bytes)} (in {self.root}); "
                    f"raise --stage-max-gb (${ENV_MAX_GB}) or hold fewer slides at once")
            if time.monotonic() > deadline:
                raise StagingError(
                    f"cannot stage {url} ({_gb(size)}): the slide cache in {self.root} stayed "
                    f"full ({_gb(used)} of {_gb(self.max_bytes)} in use by other processes) for "
                    f"{self.wait_s:g} s; raise --stage-max-gb (${ENV_MAX_GB}) or run fewer "
                    "workers")
            time.sleep(0.2)

    def _retrying(self, url: str, action):
        """``action()``, retried on transient storage errors with backoff for ``retry_s``."""
        waits = backoff(self.retry_s)
        told = False
        while True:
            try:
                return action()
            except StagingError:
                raise
            except Exception as exn:
                if not (is_transient(exn) or isinstance(exn, _SizeMismatch)):
                    raise StagingError(storage_message(url, exn, "read")) from exn
                wait = next(waits, None)
                if wait is None:
                    raise StagingError(storage_message(url, exn, "read") + f" Gave up after "
                                       f"retrying for {self.retry_s:g} s.") from exn
                if not told:  # say what the wait is for, once per slide, not minutes of silence
                    told = True
                    log.warning("cannot read %s (%s: %s); retrying for up to %g s (is the storage "
                                "server at %s up?)", url, type(exn).__name__, exn, self.retry_s,
                                endpoint_of(url))
                time.sleep(wait)


class _SizeMismatch(OSError):
    """A downloaded file is not the size listed (a transfer cut short): worth another try."""


# Fields of fsspec's file details that change when an object is replaced (s3fs, gcsfs, local).
VERSION_FIELDS = ("ETag", "etag", "md5Hash", "VersionId", "LastModified", "updated", "mtime")


def _tag(info: dict) -> str:
    return " ".join(f"{k}={info[k]}" for k in VERSION_FIELDS if info.get(k) not in (None, ""))



def _version(url: str, files: list[tuple[str, str, int, str]]) -> str:
    """What identifies the copy to stage: the endpoint, then each file's name, size and tag."""
    return "\n".join([endpoint_of(url)] + [f"{rel} {size} {tag}" for _, rel, size, tag in files])


def _remote_files(url: str, name: str) -> tuple[list[tuple[str, str, int, str]], str | None]:
    """(remote path, local path relative to the entry, bytes, version tag) of the slide's files,
    and the slide file's ETag, as the store says now (not from a listing cached earlier in this process): the slide, and for
    MIRAX (.mrxs) every file of the sibling folder of the same stem."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(path)
    info = fs.info(path)
    if info.get("type") == "directory":
        raise IsADirectoryError(errno.EISDIR, "a folder, not a slide file", url)
    files = [(path, name, int(info["size"]), _tag(info))]
    if name.lower().endswith(".mrxs"):
        stem = posixpath.splitext(path)[0]
        fs.invalidate_cache(stem)
        data = fs.find(stem, detail=True)
        if not data:
            raise FileNotFoundError(errno.ENOENT, "a MIRAX slide needs its data folder "
                                    f"{posixpath.basename(stem)}/ next to the .mrxs file", url)
        base = posixpath.dirname(path)
        files += [(p, posixpath.relpath(p, base), int(d["size"]), _tag(d))
                  for p, d in sorted(data.items())]
    return files, etag_of(info)


def _fetch(url: str, files: list[tuple[str, str, int, str]], folder: str) -> None:
    """Download ``files`` into ``folder`` and check each one's size."""
    fs, _ = fsspec.core.url_to_fs(url)
    for remote, relative, size, _ in files:
        target = os.path.join(folder, *relative.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(remote, target)
        if os.path.getsize(target) != size:
            raise _SizeMismatch(f"{remote}: got {os.path.getsize(target)} bytes of {size}")


_default: dict[tuple, SlideCache] = {}


def default_cache(keep: bool = False) -> SlideCache:
    """This process's cache in `default_root()` with the environment's limit (one per setting,
    so pool workers and engines' tasks follow `midnight-prep --stage-dir/--stage-max-gb`)."""
    setting = (default_root(), os.environ.get(ENV_MAX_GB), keep)
    if setting not in _default:
        _default[setting] = SlideCache(setting[0], keep=keep)
    return _default[setting]

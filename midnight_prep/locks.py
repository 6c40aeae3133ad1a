"""Job locks on the output, so that two builders (two `build` commands, SLURM array tasks run
twice, a requeued task) never work on the same job at once.

A lock is a small JSON file `OUT/locks/JOB.lock` with its owner's host, pid, a random token and
start time, made by an exclusive create: a hard link of a finished temporary file locally (one
of two creators fails; link is atomic on local disks, NFS and the usual cluster filesystems), a
conditional PUT (`If-None-Match: *`, sent by s3fs) on object storage. The owner refreshes the
lock's modification time every HEARTBEAT_S, rewriting it with the job's progress so far (slides
and tiles done, for `status`) when that changed. A lock is stale, and is taken over, when its owner
ran on this host and is gone, or when it has not been refreshed for STALE_S (an owner on
another machine that died).

Object stores that ignore the conditional PUT let the last writer win: each writer reads the
lock back and only the one whose token it holds goes on; two builders can still both pass in a
narrow window. That costs time only: a job's shards are the same bytes whoever writes them, each
publish is one atomic PUT, and the manifest is last.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import fsspec

from .shards import _partial, create_new, is_local, join, local_path, retried
from .storage import is_transient

LOCK_DIR = "locks"
HEARTBEAT_S = 60.0
STALE_S = 600.0
HOST = socket.gethostname()


def lock_url(output: str, job_id: str) -> str:
    return join(output, f"{LOCK_DIR}/{job_id}.lock")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def describe(holder: dict) -> str:
    """'host:pid since 12:00:00 UTC' for messages."""
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(since)) if isinstance(since, (int, float)) else "?"
    return f"{holder.get('host', '?')}:{holder.get('pid', '?')} since {when}"


def _read(url: str, retry: bool = True) -> tuple[dict, float] | None:
    """(holder, seconds since the last heartbeat) of the lock at ``url``; None when there is none.
    Transient storage errors are retried (`storage.retrying`) unless ``retry`` is false."""
    fs, path = fsspec.core.url_to_fs(url)

    def read() -> tuple[bytes, float] | None:
        try:
            data = fs.cat_file(path)
            if is_local(url):
                return data, time.time() - os.stat(local_path(url)).st_mtime
            modified = fs.modified(path)
            if modified.tzinfo is None:
                modified = modified.replace(tzinfo=timezone.utc)
            return data, (datetime.now(timezone.utc) - modified).total_seconds()
        except FileNotFoundError:
            return None
    found = retried(read, url, "read") if retry else read()
    if found is None:
        return None
    data, age = found
    try:
        holder = json.loads(data)
    except ValueError:
        holder = {}  # unreadable: stale only by age
    return (holder if isinstance(holder, dict) else {}), age


def is_stale(holder: dict, age_s: float) -> bool:
    if age_s > STALE_S:
        return True
    pid = holder.get("pid")
    return holder.get("host") == HOST and isinstance(pid, int) and not pid_alive(pid)


def _take_over(url: str, holder: dict) -> None:
    """Remove a stale lock, unless it changed hands meanwhile."""
    if not is_local(url):
        fs, path = fsspec.core.url_to_fs(url)
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass
        return
    path = local_path(url)
    aside = f"{path}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}.stale"
    try:
        os.rename(path, aside)  # atomic: of several takers, one moves this file
    except FileNotFoundError:
        return
    try:
        with open(aside, "rb") as f:
            moved = json.loads(f.read() or b"{}")
    except ValueError:
        moved = {}
    if moved.get("token") != holder.get("token"):  # a fresh lock slipped in: put it back
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    os.unlink(aside)


def live_holder(url: str) -> dict | None:
    """Who holds the lock at ``url``; None when no live builder does."""
    found = _read(url)
    if found is None or is_stale(*found):
        return None
    return found[0]


@dataclass
class LockInfo:
    holder: dict  # host, pid, since, and "progress" once its first heartbeat carried some
    age_s: float  # seconds since the last heartbeat
    stale: bool


def _modified_age(entry: dict) -> float | None:
    """Seconds since an fsspec listing entry was modified (object stores: LastModified)."""
    modified = entry.get("LastModified") or entry.get("last_modified") or entry.get("mtime")
    if isinstance(modified, (int, float)):
        return time.time() - modified
    if isinstance(modified, datetime):
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=timezone.utc)
        return (datetime.now(timezone.utc) - modified).total_seconds()
    return None


def read_locks(output: str) -> dict[str, LockInfo]:
    """job_id -> LockInfo for every lock under ``output``: one listing and one batched read,
    so `status` stays quick with hundreds of builders on object storage."""
    fs, base = fsspec.core.url_to_fs(join(output, LOCK_DIR))
    fs.invalidate_cache()
    try:
        entries = [e for e in fs.ls(base, detail=True) if e["name"].endswith(".lock")]
    except FileNotFoundError:
        return {}
    blobs = fs.cat([e["name"] for e in entries], on_error="return") if entries else {}
    found = {}
    for entry in sorted(entries, key=lambda e: e["name"]):
        job_id = entry["name"].rsplit("/", 1)[-1][:-len(".lock")]
        blob = blobs.get(entry["name"])
        age = _modified_age(entry)
        if not isinstance(blob, bytes) or age is None:  # released meanwhile, or no date listed
            read = _read(lock_url(output, job_id))
            if read is None:
                continue
            holder, age = read
        else:
            try:
                holder = json.loads(blob)
            except ValueError:
                holder = {}
            holder = holder if isinstance(holder, dict) else {}
        found[job_id] = LockInfo(holder, max(0.0, age), is_stale(holder, age))
    return found


def all_locks(output: str) -> dict[str, tuple[dict, bool]]:
    """job_id -> (holder, stale) for every lock under ``output``."""
    return {job_id: (info.holder, info.stale) for job_id, info in read_locks(output).items()}


@dataclass
class Lock:
    url: str
    owner: dict
    progress: dict[str, int] = field(default_factory=lambda: {"slides": 0, "tiles": 0})
    _written: dict[str, int] = field(default_factory=dict)  # the progress the lock file holds

    def holds(self, retry: bool = True) -> bool:
        found = _read(self.url, retry)
        return found is not None and found[0].get("token") == self.owner["token"]

    def counting(self, progress: Callable[[str, int], None] | None) -> Callable[[str, int], None]:
        """A job progress callback that also counts slides and tiles done into this lock (the
        next heartbeat writes them), then calls ``progress``."""
        def report(kind: str, n: int) -> None:
            if kind in self.progress:
                self.progress[kind] += n
            if progress:
                progress(kind, n)
        return report

    def refresh(self) -> None:
        if not self.holds(retry=False):  # the next beat tries again
            return  # taken over (we looked dead): leave the new owner's lock alone
        now = dict(self.progress)
        data = json.dumps({**self.owner, "progress": now}).encode()
        if not is_local(self.url):
            fs, path = fsspec.core.url_to_fs(self.url)
            fs.pipe_file(path, data)
        elif now == self._written:
            os.utime(local_path(self.url))
        else:  # a new file renamed over the lock: readers see the old one or the new one
            fd, tmp = _partial(Path(local_path(self.url)))
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, local_path(self.url))
            finally:
                Path(tmp).unlink(missing_ok=True)
        self._written = now

    def release(self) -> None:
        """Remove the lock; with the storage down it is left to go stale (its owner is gone
        by then), so that the job's own outcome, not this, is what gets reported."""
        _HEARTBEAT.forget(self)
        try:
            if self.holds(retry=False):
                fs, path = fsspec.core.url_to_fs(self.url)
                fs.rm_file(path)
        except FileNotFoundError:
            pass
        except Exception as exn:
            if not is_transient(exn):
                raise


def acquire(url: str, job_id: str) -> Lock | dict:
    """The lock at ``url`` (refreshed in the background until released), or the holder's
    description when another live builder has it."""
    owner = {"job_id": job_id, "host": HOST, "pid": os.getpid(), "token": secrets.token_hex(8),
             "since": time.time()}
    holder: dict = {}
    for _ in range(5):
        try:
            create_new(json.dumps(owner).encode(), url)
        except FileExistsError:
            found = _read(url)
            if found is None:
                continue  # released meanwhile
            holder, age = found
            if holder.get("token") != owner["token"]:  # (ours: a retried create whose reply was lost)
                if not is_stale(holder, age):
                    return holder
                _take_over(url, holder)
                continue
        lock = Lock(url, owner)
        if not lock.holds():  # an object store that ignored the exclusive create
            found = _read(url)
            return found[0] if found else {}
        _HEARTBEAT.keep(lock)
        return lock
    return holder


class _Heartbeat:
    """One daemon thread per process refreshing every held lock."""

    def __init__(self):
        self._held: dict[str, Lock] = {}
        self._mutex = threading.Lock()
        self._thread: threading.Thread | None = None

    def keep(self, lock: Lock) -> None:
        with self._mutex:
            self._held[lock.url] = lock
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="lock-heartbeat")
                self._thread.start()

    def forget(self, lock: Lock) -> None:
        with self._mutex:
            self._held.pop(lock.url, None)

    def _run(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._mutex:
                held = list(self._held.values())
            for lock in held:
                try:
                    lock.refresh()
                except Exception:  # storage hiccup (OSError or botocore's own errors): the next beat tries again
                    pass


_HEARTBEAT = _Heartbeat()

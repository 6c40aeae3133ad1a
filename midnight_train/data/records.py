"""Raw training records from shards, with damage skipped and counted instead of raised.

Reasons: an unreadable shard (`shard_error`), a truncated or corrupt tar (`shard_truncated`: the
samples before the damage are kept), a sample without `.jpg`, a repeated member, or bad JSON
where a group filter needs it (`malformed`), an undecodable JPEG (`decode_error`, counted by the
decoder's caller). Storage that is down or restarting is waited for, not counted."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from midnight_prep.shards import ShardOpenError, read_shard
from midnight_prep.storage import StorageError, backoff, is_transient, storage_message

log = logging.getLogger(__name__)

REASONS = ("decode_error", "malformed", "shard_error", "shard_truncated")


class SkipCounts:
    """Skip counts by reason with rate-limited warnings (1st, 2nd, 4th, …, 10th, 100th, …)."""

    def __init__(self, initial: dict[str, int] | None = None) -> None:
        self.counts = {r: 0 for r in REASONS}
        self.counts.update(initial or {})

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        n = self.counts[reason]
        if n & (n - 1) == 0 or math.log10(n).is_integer():
            log.warning("skipped (%s, %d so far): %s", reason, n, detail)


def shard_records(url: str, counts: SkipCounts, *, stride: int = 1, offset: int = 0,
                  group: str | None = None, retry_s: float = 300.0) -> Iterator[dict[str, Any]]:
    """Samples ({"__key__", "__url__", "jpg", "json"?}) of one shard, every stride-th from
    offset, only those whose JSON `group` equals `group` when given.

    Damage ends or skips with a count, never an exception. A transient storage error (server
    down or restarting, connection reset, throttling) is retried with backoff for up to
    `retry_s`: the shard is reopened and read on from the same sample, so the stream is exactly
    the uninterrupted one; past the budget StorageError is raised (the run stops rather than
    change its sample stream; resume=auto continues exactly once the storage is back)."""
    done = 0  # samples of the shard already handled (yielded, skipped or filtered out)
    reading = 0  # index of the sample being read now

    def duplicate(message: str) -> None:
        if reading >= done:  # not counted already on an earlier reading
            counts.skip("malformed", message)

    waits = backoff(retry_s)
    while True:
        reading = 0
        try:
            for i, (key, files) in enumerate(read_shard(url, on_duplicate=duplicate)):
                reading = i + 1
                if i < done:  # reopened after an error: already handled
                    continue
                done = i + 1
                if i % stride != offset:
                    continue
                if "jpg" not in files:
                    counts.skip("malformed", f"{url}: {key} has no .jpg")
                    continue
                if group is not None:
                    try:
                        if json.loads(files["json"]).get("group") != group:
                            continue
                    except Exception:
                        counts.skip("malformed", f"{url}: {key} has no valid .json")
                        continue
                yield {**files, "__key__": key, "__url__": url}
                waits = backoff(retry_s)  # progress: a later outage gets the whole budget
            return
        except Exception as exn:
            cause = exn.__cause__ if isinstance(exn, ShardOpenError) and exn.__cause__ else exn
            if not is_transient(cause):
                if isinstance(exn, ShardOpenError):  # missing, permission: the shard is skipped
                    counts.skip("shard_error", str(exn))
                else:  # truncated or corrupt tar: keep what came before
                    counts.skip("shard_truncated", f"{url}: {exn!r}")
                return
            wait = next(waits, None)
            if wait is None:
                raise StorageError(
                    storage_message(url, cause) + f" Gave up after retrying for {retry_s:g} s "
                    f"(data.read_retry_s); the stream position is kept: resume with "
                    f"resume=auto when the storage is back.") from exn
            log.warning("retrying %s in %.1f s from sample %d: %s: %s", url, wait, done,
                        type(cause).__name__, cause)
            time.sleep(wait)

"""Raw training records from shards, with damage skipped and counted instead of raised.

Reasons: an unreadable shard (`shard_error`), a truncated or corrupt tar (`shard_truncated`: the
samples before the damage are kept), a sample without `.jpg`, a repeated member, or bad JSON
where a group filter needs it (`malformed`), an undecodable JPEG (`decode_error`, counted by the
decoder's caller)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from typing import Any

from midnight_prep.shards import ShardOpenError, read_shard

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
                  group: str | None = None) -> Iterator[dict[str, Any]]:
    """Samples ({"__key__", "__url__", "jpg", "json"?}) of one shard, every stride-th from
    offset, only those whose JSON `group` equals `group` when given. Damage ends or skips with a
    count, never an exception."""
    duplicate = lambda message: counts.skip("malformed", message)  # noqa: E731
    try:
        for i, (key, files) in enumerate(read_shard(url, on_duplicate=duplicate)):
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
    except ShardOpenError as exn:  # missing, permission, network: the shard is skipped
        counts.skip("shard_error", str(exn))
    except Exception as exn:  # truncated or corrupt tar: keep what came before
        counts.skip("shard_truncated", f"{url}: {exn!r}")

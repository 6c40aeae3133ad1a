"""Where the training shards are: a source spec → the shard URLs, and which stream reads which.

A shard source is a list of sources, a brace pattern (`train-{000000..000999}.tar`), a single
`.tar`, a glob, a shard-builder output directory (its `manifests/*.json` list the finished
shards; without manifests every `*.tar` below it), or a prefix (`s3://bucket/train-` →
`train-*.tar`); local paths or any fsspec URL."""

from __future__ import annotations

import json
import os
import posixpath

import braceexpand
import fsspec

from midnight_prep.shards import is_local, local_path
from midnight_prep.storage import PERMANENT, StorageError, is_transient, storage_message


class NoShardsFound(FileNotFoundError):
    """The source exists (or its storage answered) but holds no shards."""


def list_shards(source: str | list[str]) -> list[str]:
    """Shard URLs of a source, sorted within each source."""
    return [url for url, _ in shard_counts(source)]


def shard_counts(source: str | list[str]) -> list[tuple[str, int | None]]:
    """(shard URL, samples) of a source; samples come from the shard builder's manifests and
    are None where unknown (no manifests: the shards are not read here). Storage that cannot be
    listed (down, refused credentials, no such bucket) raises StorageError with a message that
    names the endpoint and bucket."""
    try:
        return _shard_counts(source)
    except NoShardsFound:
        raise
    except Exception as exn:
        if is_local(str(source)) or not (is_transient(exn) or isinstance(exn, PERMANENT)):
            raise
        raise StorageError(storage_message(str(source), exn, "list")) from exn


def _shard_counts(source: str | list[str]) -> list[tuple[str, int | None]]:
    if isinstance(source, (list, tuple)):
        return [entry for item in source for entry in _shard_counts(item)]
    if "{" in source:  # listed as given: a missing one is skipped and counted when read
        return [(url, None) for url in braceexpand.braceexpand(source)]
    if source.endswith(".tar") and not any(c in source for c in "*?["):
        return [(source, None)]
    fs, path = fsspec.core.url_to_fs(source)

    def url(p: str) -> str:
        return fs.unstrip_protocol(p) if "://" in source else p

    if any(c in path for c in "*?["):
        found = [url(p) for p in sorted(fs.glob(path))]
    elif fs.isdir(path):
        listed = manifest_counts(source)
        if listed is not None:
            return [(u, n) for u, n in listed.items() if n is None or n > 0]
        found = [url(p) for p in sorted(fs.glob(posixpath.join(path, "**", "*.tar")))]
    else:
        found = [url(p) for p in sorted(fs.glob(path + "*.tar"))]
    if not found:
        raise NoShardsFound(f"no shards found at {source!r} (a directory, glob or prefix "
                                f"with no *.tar below it)")
    return [(u, None) for u in found]


def manifest_counts(source: str) -> dict[str, int | None] | None:
    """{shard URL: samples (None where the entry has no count)} from a shard-builder output
    directory's `manifests/*.json`, sorted by URL; None when `source` has no manifests."""
    fs, path = fsspec.core.url_to_fs(source)
    manifests = sorted(fs.glob(posixpath.join(path, "manifests", "*.json")))
    if not manifests:
        return None
    counts: dict[str, int | None] = {}
    for m in manifests:
        try:
            with fs.open(m, "rb") as f:
                entries = json.load(f).get("shards", [])
        except (ValueError, AttributeError) as exn:
            raise ValueError(f"{m}: not a valid shard manifest ({exn}); rebuild that job with "
                             f"midnight-prep or delete the manifest") from exn
        for entry in entries:
            p = posixpath.join(path, entry["name"])
            n = entry.get("samples")
            counts[fs.unstrip_protocol(p) if "://" in source else p] = None if n is None else int(n)
    return dict(sorted(counts.items()))


def repeated_shards(urls: list[str]) -> list[str]:
    """The shards of ``urls`` listed more than once (local paths compared resolved: ``out`` and
    ``./out/`` are the same shards), each named once."""
    seen: set[str] = set()
    repeated: dict[str, None] = {}
    for url in urls:
        key = os.path.realpath(local_path(url)) if is_local(url) else url
        if key in seen:
            repeated[url] = None
        seen.add(key)
    return list(repeated)


def assign_shards(urls: list[str], stream: int, n_streams: int) -> list[tuple[str, int, int]]:
    """(url, stride, offset) triples stream `stream` reads: its own shards, or one shared shard
    of which it takes samples offset, offset + stride, … when shards are fewer than streams."""
    n = len(urls)
    if n == 0:
        raise ValueError("no shards to read")
    if n >= n_streams:
        return [(u, 1, 0) for u in urls[stream::n_streams]]
    sharers = list(range(stream % n, n_streams, n))
    return [(urls[stream % n], len(sharers), sharers.index(stream))]


def check_reachable(url: str) -> None:
    """Fail fast, with StorageError, when a remote shard's storage is down or refuses us (a
    missing shard is not fatal: the reader skips and counts it)."""
    if is_local(url):
        return
    try:
        fs, path = fsspec.core.url_to_fs(url)
        fs.info(path)
    except FileNotFoundError:
        return
    except Exception as exn:
        if is_transient(exn) or isinstance(exn, PERMANENT):
            raise StorageError(storage_message(url, exn)) from exn
        raise

"""Storage faults, for every reader and writer of shards: which errors are worth retrying, the
waits between tries, and the one-paragraph message a user gets instead of a traceback.

Endpoints and credentials come from the standard AWS variables and files (AWS_ENDPOINT_URL,
AWS_PROFILE, ~/.aws/…), read by s3fs/botocore; messages name the endpoint and the bucket, never a
secret."""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlparse


class StorageError(RuntimeError):
    """Storage that cannot be used (down past the retry budget, refused credentials, no such
    bucket); its message is the one paragraph for the user (see `storage_message`)."""


# A missing object or bucket and a refusal do not get better by waiting.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(exn: BaseException) -> bool:
    """True for errors that may pass: connection refused/reset, timeouts, 5xx and throttling
    (s3fs raises these as OSError or botocore's connection errors) — not for missing objects,
    refused credentials or data that is damaged."""
    if isinstance(exn, PERMANENT):
        return False
    if isinstance(exn, (ConnectionError, TimeoutError)):
        return True
    try:
        import botocore.exceptions as boto
    except ImportError:  # no s3 support installed
        boto = None
    if boto is not None and isinstance(exn, boto.BotoCoreError):
        return not isinstance(exn, (boto.NoCredentialsError, boto.PartialCredentialsError,
                                    boto.ParamValidationError))
    try:
        import aiohttp
    except ImportError:
        aiohttp = None
    if aiohttp is not None and isinstance(exn, aiohttp.ClientError):
        return True
    return type(exn) is OSError  # s3fs's translation of 5xx / SlowDown


def backoff(budget_s: float, first_s: float = 0.5, cap_s: float = 30.0) -> Iterator[float]:
    """Waits between tries: doubling from `first_s` up to `cap_s`, until `budget_s` is spent."""
    spent, wait = 0.0, first_s
    while spent + wait <= budget_s:
        yield wait
        spent += wait
        wait = min(2 * wait, cap_s)


def endpoint_of(url: str) -> str:
    """Where `url` lives, for messages: the S3 endpoint in use, or the local filesystem."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        return "the local filesystem"
    if scheme in ("s3", "s3a"):
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or \
            "AWS S3 (no AWS_ENDPOINT_URL set)"
    return f"{scheme}://"


def storage_message(url: str, exn: BaseException, doing: str = "read") -> str:
    """One paragraph: what failed, where (endpoint, bucket), and what to check."""
    parsed = urlparse(url)
    where = f"{url} (endpoint {endpoint_of(url)}" + (f", bucket {parsed.netloc!r})" if parsed.netloc else ")")
    reason = f"{type(exn).__name__}: {exn}"
    if isinstance(exn, PermissionError):
        check = ("check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
                 "or ~/.aws/credentials) and that they may " + doing + " this bucket")
    elif isinstance(exn, FileNotFoundError):
        check = "check the bucket and path names (a bucket must exist before it is used)"
    elif is_transient(exn):
        check = ("check that the storage server is up and reachable from this machine and that "
                 "the endpoint is right (AWS_ENDPOINT_URL or the storage options)")
    else:
        check = "check the path and the storage settings"
    return f"cannot {doing} {where}: {reason}. What to do: {check}."

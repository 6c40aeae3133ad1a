"""Storage faults, for every reader and writer of shards: which errors are worth retrying, the
waits between tries, and the one-paragraph message a user gets instead of a traceback.

Endpoints and credentials come from the standard AWS variables and files (AWS_ENDPOINT_URL,
AWS_PROFILE, ~/.aws/…), read by s3fs/botocore, and from optional storage options (`configure`:
fsspec keyword arguments for the output's protocol, kept in fsspec's config in memory, handed
to worker processes by `worker_config`/`apply_worker_config`, never written anywhere). Messages
name the endpoint and the bucket, never a secret."""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import urlparse

import fsspec
import fsspec.config

T = TypeVar("T")
log = logging.getLogger(__name__)

# How long one write (a shard, a manifest) keeps retrying transient errors before the job fails;
# the environment variable overrides it (tests use a few seconds).
RETRY_S = 120.0
RETRY_ENV = "MIDNIGHT_STORAGE_RETRY_S"
# The first look at the output: one try, short timeouts, so a server that is down is reported
# in seconds, not after the retry budget.
PROBE_TIMEOUTS = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 1}}


class IncompleteUpload(ConnectionError):
    """The stored object does not have the size of what was sent (retried like a dropped link)."""


class StorageError(RuntimeError):
    """Storage that cannot be used (down past the retry budget, refused credentials, no such
    bucket); its message is the one paragraph for the user (see `storage_message`)."""


# A missing object or bucket and a refusal do not get better by waiting.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


# botocore's errors for credentials that are missing or incomplete (named, so botocore stays optional).
CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError")


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
    """Where `url` lives, for messages: the S3 endpoint in use (storage options first, then the
    AWS variables), or the local filesystem."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file"):
        return "the local filesystem"
    if scheme in ("s3", "s3a"):
        try:  # what botocore resolved from the options, the AWS variables and the profile
            return fsspec.filesystem(scheme).s3.meta.endpoint_url
        except Exception:
            options = fsspec.config.conf.get(scheme, {})
            return (options.get("endpoint_url") or options.get("client_kwargs", {}).get("endpoint_url")
                    or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    or "AWS S3 (no AWS_ENDPOINT_URL set)")
    return f"{scheme}://"


def storage_message(url: str, exn: BaseException, doing: str = "read") -> str:
    """One paragraph: what failed, where (endpoint, bucket), and what to check."""
    parsed = urlparse(url)
    where = f"{url} (endpoint {endpoint_of(url)}" + (f", bucket {parsed.netloc!r})" if parsed.netloc else ")")
    reason = f"{type(exn).__name__}: {str(exn).rstrip('.')}"
    if isinstance(exn, PermissionError) or type(exn).__name__ in CREDENTIAL_ERRORS:
        check = ("check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, "
                 "~/.aws/credentials or the storage options) and that they may " + doing + " this bucket")
    elif isinstance(exn, FileNotFoundError):
        check = "check the bucket and path names (a bucket must exist before it is used)"
    elif is_transient(exn):
        check = ("check that the storage server is up and reachable from this machine and that "
                 "the endpoint is right (AWS_ENDPOINT_URL or the storage options)")
    else:
        check = "check the path and the storage settings"
    return f"cannot {doing} {where}: {reason}. What to do: {check}."


def retry_budget() -> float:
    return float(os.environ.get(RETRY_ENV, RETRY_S))


def retrying(action: Callable[[], T], url: str, doing: str, budget_s: float | None = None) -> T:
    """``action()``, tried again with doubling waits while it fails with a transient error, for
    up to ``budget_s`` (default `retry_budget()`); then StorageError with the one-paragraph
    message. Other errors propagate at once."""
    budget = retry_budget() if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    wait = 0.5
    while True:
        try:
            return action()
        except Exception as exn:
            if not is_transient(exn):
                raise
            if time.monotonic() + wait > deadline:
                raise StorageError(storage_message(url, exn, doing)
                                   + f" Gave up after retrying for {budget:g} s.") from exn
            log.warning("cannot %s %s (%s: %s); retrying in %g s", doing, url, type(exn).__name__,
                        exn, wait)
            time.sleep(wait)
            wait = min(2 * wait, 30.0)


def protocol_of(url: str) -> str:
    scheme = urlparse(url).scheme
    return scheme if scheme and "://" in url else "file"


def configure(url: str, options: dict | None) -> None:
    """Use ``options`` (fsspec keyword arguments: key, secret, endpoint_url, client_kwargs, …)
    for ``url``'s protocol in this process; `worker_config` carries them to workers."""
    if not options:
        return
    protocol = protocol_of(url)
    fsspec.config.conf.setdefault(protocol, {}).update(options)
    fsspec.get_filesystem_class(protocol).clear_instance_cache()


def worker_config() -> dict:
    """fsspec's configuration of this process (storage options included), for `apply_worker_config`
    in a worker process: spawned workers start from the environment and config files only."""
    return copy.deepcopy(fsspec.config.conf)


def apply_worker_config(conf: dict) -> None:
    for protocol, options in conf.items():
        fsspec.config.conf.setdefault(protocol, {}).update(options)


def probe(url: str) -> None:
    """Look at ``url`` once, with short timeouts, before any work: StorageError with the
    one-paragraph message when its server is down, the credentials are refused or the bucket
    does not exist. A folder that does not exist yet (in a bucket that does) is fine."""
    protocol = protocol_of(url)
    if protocol == "file":
        return
    cls = fsspec.get_filesystem_class(protocol)
    kwargs: dict = {"skip_instance_cache": True}
    if protocol in ("s3", "s3a"):
        configured = fsspec.config.conf.get(protocol, {}).get("config_kwargs", {})
        kwargs["config_kwargs"] = {**configured, **PROBE_TIMEOUTS}
    try:
        fs = cls(**kwargs)
        path = fs._strip_protocol(url).rstrip("/")
        try:
            fs.ls(path, detail=False)
        except FileNotFoundError:
            root = path.split("/", 1)[0]  # the bucket: it must exist, the folder need not
            try:
                fs.info(root)
            except FileNotFoundError:
                raise FileNotFoundError(f"there is no bucket {root!r}") from None
            if root == path:
                raise
    except Exception as exn:
        if isinstance(exn, (OSError, ValueError)) or is_transient(exn) or \
                type(exn).__name__ in CREDENTIAL_ERRORS:
            raise StorageError(storage_message(url, exn, "use")) from exn
        raise


def etag_of(info: dict) -> str | None:
    """The ETag in fsspec's details of a remote file (s3fs spells it ``ETag``), if any."""
    return str(info.get("ETag") or info.get("etag") or "") or None

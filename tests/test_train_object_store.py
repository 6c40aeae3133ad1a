"""Training reads shards from a real S3 server (SeaweedFS) through outages: a restart in the
middle of a shard leaves the sample stream exactly the uninterrupted one; storage that is down,
or refuses the credentials, at start is one clear message naming endpoint and bucket."""

from __future__ import annotations

import logging
import time
import uuid

import fsspec
import pytest
import shardkit

from midnight_prep.storage import StorageError
from midnight_train.data.config import DataConfig
from midnight_train.data.loader import make_loader

SMALL = dict(global_crop_size=28, local_crop_size=14, n_local_crops=2, patch_size=14,
             batch_size=4, num_workers=0, shuffle_buffer=10, shard_interleave=2)


@pytest.fixture
def s3_shards(s3_env, tmp_path, cmu_slide, monkeypatch):
    """4 shards of 8 real tiles under a fresh prefix; s3fs reads them in 16 KiB requests (so an
    outage falls in the middle of a shard) and retry a refused connection twice themselves
    (not 5 times, nor botocore 5 more: the outages here are real, only shorter)."""
    import s3fs

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setitem(fsspec.config.conf, "s3", {"default_block_size": 16 << 10})
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 2)
    fsspec.filesystem("s3").clear_instance_cache()
    local = shardkit.make_shards(tmp_path, cmu_slide, n_shards=4, per_shard=8, tile_size=64)
    prefix = f"midnight/{uuid.uuid4().hex}"
    fs = fsspec.filesystem("s3")
    for path in local:
        fs.put_file(str(path), f"{prefix}/shards/{path.name}")
    return f"s3://{prefix}/shards/"


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    return a["keys"] == b["keys"] and all(
        (a[k] == b[k]).all() for k in ("global_crops", "local_crops", "masks"))


def test_restart_mid_shard_keeps_the_exact_stream(s3_shards, s3_env):
    cfg = DataConfig(shards=s3_shards, read_retry_s=60, **SMALL)
    want = batches(make_loader(cfg, seed=3, rank=0, world_size=1), 6)
    it = iter(make_loader(cfg, seed=3, rank=0, world_size=1))
    got = [next(it) for _ in range(2)]
    retries: list[str] = []

    class RestartOnRetry(logging.Handler):
        """The server comes back once our own retry has begun (s3fs's quick retries are spent)."""

        def emit(self, record: logging.LogRecord) -> None:
            retries.append(record.getMessage())
            if s3_env.proc is None:
                s3_env.start()

    handler = RestartOnRetry(level=logging.WARNING)
    logging.getLogger("midnight_train.data.records").addHandler(handler)
    s3_env.kill()
    try:
        got += [next(it) for _ in range(4)]
    finally:
        logging.getLogger("midnight_train.data.records").removeHandler(handler)
    assert retries and "from sample" in retries[0]  # the outage hit a read in flight
    assert all(same(a, b) for a, b in zip(got, want, strict=True))


def test_storage_down_past_the_budget_stops_with_a_clear_message(s3_shards, s3_env):
    cfg = DataConfig(shards=s3_shards, read_retry_s=1, **SMALL)
    it = iter(make_loader(cfg, seed=0, rank=0, world_size=1))
    next(it)
    s3_env.kill()
    try:
        with pytest.raises(StorageError) as err:
            for _ in range(20):
                next(it)
    finally:
        s3_env.start()
    message = str(err.value)
    assert s3_env.endpoint in message and "bucket 'midnight'" in message
    assert "resume=auto" in message and "server is up" in message


def test_down_or_refused_at_start_is_one_clear_message(s3_shards, s3_env, monkeypatch):
    from object_store import SECRET_KEY

    cfg = DataConfig(shards=s3_shards, **SMALL)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    fsspec.filesystem("s3").clear_instance_cache()
    with pytest.raises(StorageError) as refused:
        make_loader(cfg, seed=0, rank=0, world_size=1)
    assert "credentials" in str(refused.value) and "bucket 'midnight'" in str(refused.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    fsspec.filesystem("s3").clear_instance_cache()
    s3_env.kill()
    started = time.monotonic()
    try:
        with pytest.raises(StorageError) as down:
            make_loader(cfg, seed=0, rank=0, world_size=1)
    finally:
        s3_env.start()
    assert time.monotonic() - started < 30
    message = str(down.value)
    assert s3_env.endpoint in message and "server is up" in message
    assert SECRET_KEY not in message and "not-the-secret" not in str(refused.value)

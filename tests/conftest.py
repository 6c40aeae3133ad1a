"""Shared fixtures. Tests use real components: OpenSlide on real files, real shards, real torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# No hub look-ups from tests (a failed one retries for ~50 s): weights come from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # test helpers such as shardkit.py


@pytest.fixture(scope="session")
def cmu_slide():
    """Path of the real CC0 CMU-1-Small-Region.svs (20x, 0.499 µm/px), fetched once and cached."""
    from midnight_prep.samples import cmu_small_region

    return cmu_small_region()


@pytest.fixture(scope="session")
def slide_dir(tmp_path_factory, cmu_slide):
    """A small archive of real slide files covering the cases the shard builder must handle."""
    from midnight_prep.samples import background, cmu_tissue, write_pyramid

    d = tmp_path_factory.mktemp("slides")
    tissue = cmu_tissue(cmu_slide, 3072, 2560)  # real H&E, as if scanned at 0.25 µm/px
    write_pyramid(d / "generic40x.tiff", tissue, mpp=0.25)  # levels 0.25 / 1 / 4 µm/px
    write_pyramid(d / "aperio40x.svs", tissue[::-1].copy(), mpp=0.25, svs=True)
    write_pyramid(d / "scan20x.tiff", tissue[::2, ::2].copy(), mpp=0.5, downsamples=(1, 4))
    write_pyramid(d / "nompp.tiff", tissue[:1024, :1024].copy(), mpp=None, downsamples=(1,))
    write_pyramid(d / "glass.tiff", background(2048, 2048), mpp=0.25)
    good = (d / "generic40x.tiff").read_bytes()
    (d / "corrupt.svs").write_bytes(good[:4096] + b"\0" * 4096)  # header survives, data gone
    damaged = bytearray(good)  # opens fine, but most tile data is zeroed: reads fail
    damaged[len(good) // 5: len(good) * 9 // 10] = bytes(len(good) * 9 // 10 - len(good) // 5)
    (d / "damaged.tiff").write_bytes(bytes(damaged))
    (d / "notaslide.tiff").write_bytes(b"this is not a TIFF file at all" * 100)
    return d


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A real S3 server (SeaweedFS) on loopback for the whole session: `.env()` gives the AWS
    variables that point s3fs at it, `.kill()` / `.start()` make an outage (data kept)."""
    from object_store import ObjectStore

    store = ObjectStore(tmp_path_factory.mktemp("object-store"))
    store.start()
    yield store
    store.remove()


@pytest.fixture
def s3_env(object_store, monkeypatch):
    """This test's process talks to the session's S3 server (fresh s3fs instances)."""
    import fsspec

    if object_store.proc is None:  # a previous test left it stopped
        object_store.start()
    for key, value in object_store.env().items():
        monkeypatch.setenv(key, value)
    fsspec.filesystem("s3").clear_instance_cache()
    yield object_store
    fsspec.filesystem("s3").clear_instance_cache()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A tiny ViT trained one step on synthetic batches and exported (a model folder)."""
    from train_fakes import make_trainer, tiny_config

    from midnight_train.outputs.export import export_backbone

    tmp = tmp_path_factory.mktemp("tiny-export")
    make_trainer(tiny_config(tmp / "run", train={"max_steps": 1, "checkpoint_every": 1})).fit()
    return export_backbone(tmp / "run", tmp / "export")

"""Shared fixtures. Tests use real components: OpenSlide on real files, real shards, real torch."""

from __future__ import annotations

import os

import pytest

# No hub look-ups from tests (a failed one retries for ~50 s): weights come from local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def cmu_slide():
    """Path of the real CC0 CMU-1-Small-Region.svs (20x, 0.499 µm/px), fetched once and cached."""
    from midnight_prep.samples import cmu_small_region

    return cmu_small_region()

"""`midnight-train embed`: tiles from image files, local shards and fsspec URLs; damaged inputs
are skipped, counted and named, never abort the run."""

from __future__ import annotations

import fsspec
import numpy as np
import shardkit
from click.testing import CliRunner
from PIL import Image

from midnight_train.cli import main


def test_embed_skips_and_names_damaged_inputs(tmp_path, cmu_slide, tiny_export):
    good = shardkit.make_shards(tmp_path / "shards", cmu_slide, n_shards=1, per_shard=3, tile_size=32)[0]
    samples = shardkit.read_tar(good)
    bad = tmp_path / "bad.tar"  # a fake JPEG, a truncated JPEG, a sample without an image
    shardkit.write_tar(bad, [
        ("fake", {"jpg": b"not a jpeg at all", "json": b"{}"}),
        ("cut", {"jpg": samples[0][1]["jpg"][:200], "json": b"{}"}),
        ("noimage", {"json": b"{}"}),
        ("fine", samples[1][1]),
    ])
    fsspec.filesystem("memory").pipe("/bucket/good.tar", good.read_bytes())
    png = tmp_path / "tile.png"
    Image.fromarray(np.full((20, 20, 3), 120, np.uint8)).save(png)
    out = tmp_path / "emb.npz"
    result = CliRunner().invoke(main, ["embed", str(tiny_export), "memory://bucket/good.tar", str(bad),
                                       str(png), "--out", str(out), "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "skipped 3 unreadable input(s)" in result.output
    for name in ("fake", "cut", "noimage"):
        assert name in result.output
    saved = np.load(out)
    keys = [k for k, _ in samples]
    assert list(saved["keys"]) == keys + ["fine", str(png)]
    assert saved["embeddings"].shape == (5, 64) and np.isfinite(saved["embeddings"]).all()
    # the same tile embeds the same from the fsspec shard and from the local one
    assert np.allclose(saved["embeddings"][1], saved["embeddings"][3], atol=1e-5)


def test_embed_with_nothing_readable_fails(tmp_path, tiny_export):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8 not really")
    result = CliRunner().invoke(main, ["embed", str(tiny_export), str(junk), "--out",
                                       str(tmp_path / "e.npz")])
    assert result.exit_code != 0 and "no readable image" in result.output and "junk.jpg" in result.output

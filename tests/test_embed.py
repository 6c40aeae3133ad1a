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


def test_workers_and_batch_size_change_nothing_but_speed(tmp_path, cmu_slide, tiny_export):
    from midnight_train.outputs.embed import embed_inputs

    paths = shardkit.make_shards(tmp_path, cmu_slide, n_shards=3, per_shard=5, tile_size=40)
    inputs = [str(p) for p in paths]
    results = []
    for workers, batch in ((0, 64), (2, 3)):
        out = tmp_path / f"e{workers}.npz"
        assert embed_inputs(tiny_export, inputs, out, num_workers=workers, batch_size=batch)[0] == 15
        results.append(np.load(out))
    a, b = results
    assert list(a["keys"]) == list(b["keys"]) == [k for p in paths for k, _ in shardkit.read_tar(p)]
    assert np.allclose(a["embeddings"], b["embeddings"], atol=1e-5)
    assert set(a["slide_id"]) == {"cmu1"} and np.allclose(a["mpp"], shardkit.MPP)
    assert (a["x"] >= 0).all() and (a["y"] >= 0).all()
    cls = tmp_path / "cls.npz"
    embed_inputs(tiny_export, inputs[:1], cls, cls_only=True)
    assert np.allclose(np.load(cls)["embeddings"], a["embeddings"][:5, :32], atol=1e-5)


def test_parquet_has_one_row_per_tile_with_its_sample_fields(tmp_path, cmu_slide, tiny_export):
    import pyarrow.parquet as pq

    from midnight_train.outputs.embed import embed_inputs

    shard = shardkit.make_shards(tmp_path, cmu_slide, n_shards=1, per_shard=4, tile_size=40)[0]
    embed_inputs(tiny_export, [str(shard)], tmp_path / "e.npz")
    embed_inputs(tiny_export, [str(shard)], tmp_path / "e.parquet")
    table = pq.read_table(tmp_path / "e.parquet").to_pydict()
    npz = np.load(tmp_path / "e.npz")
    assert table["key"] == list(npz["keys"]) and table["slide_id"] == ["cmu1"] * 4
    assert table["x"] == list(npz["x"]) and np.allclose(table["mpp"], shardkit.MPP)
    assert np.allclose(np.array(table["embedding"]), npz["embeddings"])
    result = CliRunner().invoke(main, ["embed", str(tiny_export), str(shard), "--out", str(tmp_path / "e.csv")])
    assert result.exit_code == 2 and ".parquet" in result.output


def test_whole_slides_are_tiled_as_the_shard_builder_tiles_them(tmp_path, cmu_slide, slide_dir, tiny_export):
    """A slide given to embed yields the tiles a build of the same slide, µm/px, quota and seed
    writes to its shards: same keys, same embeddings. Unreadable slides and magnifications the
    slide cannot give are named."""
    from midnight_prep.cli import main as prep

    build = CliRunner().invoke(prep, ["build", str(cmu_slide), "--output", str(tmp_path / "out"),
                                      "--mpp", "1", "--tiles-per-slide", "6", "--seed", "3"])
    assert build.exit_code == 0, build.output
    from_shards, from_slide = tmp_path / "shards.npz", tmp_path / "slide.npz"
    shards = sorted((tmp_path / "out" / "shards").glob("*.tar"))
    assert CliRunner().invoke(main, ["embed", str(tiny_export), *map(str, shards), "--out", str(from_shards),
                                     "--workers", "0"]).exit_code == 0
    result = CliRunner().invoke(main, ["embed", str(tiny_export), str(cmu_slide), str(slide_dir / "corrupt.svs"),
                                       "--mpp", "1", "--tiles-per-slide", "6", "--seed", "3",
                                       "--out", str(from_slide), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "corrupt.svs" in result.output
    a, b = np.load(from_shards), np.load(from_slide)
    assert len(b["keys"]) == 6 and sorted(a["keys"]) == sorted(b["keys"])
    order = [list(a["keys"]).index(k) for k in b["keys"]]
    assert np.allclose(a["embeddings"][order], b["embeddings"], atol=1e-5)
    assert (b["mpp"] == 1.0).all() and (b["x"] >= 0).all()
    too_fine = CliRunner().invoke(main, ["embed", str(tiny_export), str(cmu_slide), "--mpp", "0.25",
                                         "--out", str(tmp_path / "none.npz"), "--workers", "0"])
    assert too_fine.exit_code == 1 and "no tiles at 0.25 µm/px" in too_fine.output

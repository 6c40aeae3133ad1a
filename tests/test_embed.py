"""`midnight-train embed`: tiles from image files, local shards and fsspec URLs; damaged inputs
are skipped, counted and named, never abort the run."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
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
    assert "BytesIO" not in result.output  # the member is named, not PIL's buffer
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
    assert not (tmp_path / "e.npz").exists()


def test_a_failed_embed_keeps_the_earlier_file_and_bad_options_fail_before_any_work(tmp_path, tiny_export):
    png = tmp_path / "tile.png"
    Image.fromarray(np.full((40, 40, 3), 150, np.uint8)).save(png)
    out = tmp_path / "e.npz"
    first = CliRunner().invoke(main, ["embed", str(tiny_export), str(png), "--out", str(out)])
    assert first.exit_code == 0 and "1/1" in first.output  # the progress bar has a total (inputs)
    good = out.read_bytes()
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    failed = CliRunner().invoke(main, ["embed", str(tiny_export), str(junk), "--out", str(out)])
    assert failed.exit_code == 1 and "nothing written" in failed.output
    assert out.read_bytes() == good and not list(tmp_path.glob(".*"))
    (tmp_path / "d.npz").mkdir()
    for args, message in ((["--out", str(tmp_path / "missing" / "e.npz")], "does not exist"),
                          (["--out", str(tmp_path / "d.npz")], "is a folder"),
                          (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-1"], "--batch-size"),
                          (["--workers", "-1"], "--workers"), (["--img-size", "50"], "patch size 14")):
        result = CliRunner().invoke(main, ["embed", str(tiny_export), str(png), *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "missing").exists()


def _edited_export(tmp_path, tiny_export, edit):
    import json
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_embed_reads_config_json_as_timm_does(tmp_path, cmu_slide, tiny_export):
    """config.json is what timm reads; an edit there reaches `embed` the same way (the
    safetensors metadata is not a second, silently different source)."""
    import timm
    import torch

    tiles = []
    for i, tile in enumerate(shardkit.tissue_tiles(cmu_slide, 3, size=64, seed=2)):
        tiles.append(str(tmp_path / f"tile{i}.png"))
        Image.fromarray(tile).save(tiles[-1])

    def edit(config):
        config["pretrained_cfg"].update(mean=[0.7, 0.6, 0.5], std=[0.1, 0.2, 0.3], interpolation="bilinear")
    folder = _edited_export(tmp_path, tiny_export, edit)
    before, after = tmp_path / "before.npz", tmp_path / "after.npz"
    for weights, out in ((tiny_export, before), (folder, after)):
        result = CliRunner().invoke(main, ["embed", str(weights), *tiles, "--out", str(out), "--workers", "0"])
        assert result.exit_code == 0, result.output
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    with torch.no_grad():
        tokens = model.forward_features(torch.stack([transform(Image.open(t).convert("RGB")) for t in tiles]))
    plain = torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(1)], -1).numpy()
    assert np.allclose(np.load(after)["embeddings"], plain, atol=1e-4)
    assert not np.allclose(np.load(before)["embeddings"], plain, atol=1e-2)


@pytest.mark.parametrize("edit, message", [
    (None, "not valid JSON"),
    (lambda c: c["model_args"].update(embed_dim=64), "do not fit"),
    (lambda c: c["pretrained_cfg"].update(std=[0.2, 0, 0.2]), "pretrained_cfg.std"),
    (lambda c: c["pretrained_cfg"].update(crop_pct=0.875), "crop_pct"),
    (lambda c: c.pop("architecture"), "architecture"),
    (lambda c: c["model_args"].update(img_size=30), "input size 30: not a multiple"),
])
def test_embed_refuses_a_config_json_it_cannot_follow(tmp_path, tiny_export, edit, message):
    folder = _edited_export(tmp_path, tiny_export, edit or (lambda c: None))
    if edit is None:
        (folder / "config.json").write_text('{"architecture": "vit_small_patch14_dinov2",')
    png = tmp_path / "tile.png"
    Image.fromarray(np.full((40, 40, 3), 150, np.uint8)).save(png)
    result = CliRunner().invoke(main, ["embed", str(folder), str(png), "--out", str(tmp_path / "e.npz")])
    assert result.exit_code == 1 and "config.json" in result.output and message in result.output, result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "e.npz").exists()
    (tmp_path / "set.csv").write_text("path,label\ntile.png,a\ntile.png,a\n")
    evaluated = CliRunner().invoke(main, ["eval", str(folder), "--train", str(tmp_path / "set.csv"),
                                          "--test", str(tmp_path / "set.csv")])
    assert evaluated.exit_code == 1 and message in evaluated.output, evaluated.output


def test_tiffs_are_slides_when_openslide_opens_a_pyramid_and_images_otherwise(tmp_path, slide_dir, tiny_export):
    """A pyramidal TIFF is tiled as a slide; a plain TIFF tile is one image; a .tif that is
    neither is skipped with its name; a slide list gives the µm/px a slide lacks."""
    plain = tmp_path / "tile.tif"
    Image.fromarray(np.full((60, 50, 3), 140, np.uint8)).save(plain)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"II*\0 not really a tiff")
    out = tmp_path / "e.npz"
    result = CliRunner().invoke(main, ["embed", str(tiny_export), str(slide_dir / "generic40x.tiff"), str(plain),
                                       str(junk), "--mpp", "1", "--tiles-per-slide", "3", "--out", str(out),
                                       "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable" in result.output and "junk.tif" in result.output
    saved = np.load(out)
    assert list(saved["slide_id"]) == ["generic40x"] * 3 + [""] and list(saved["keys"])[-1] == str(plain)
    assert np.allclose(saved["mpp"][:3], 1.0) and (saved["x"][:3] >= 0).all()
    slides = tmp_path / "slides.csv"
    slides.write_text(f"path,mpp\n{slide_dir / 'nompp.tiff'},0.25\n")
    listed = CliRunner().invoke(main, ["embed", str(tiny_export), str(slides), "--mpp", "0.5", "--tile-size", "128",
                                       "--tiles-per-slide", "2", "--out", str(out), "--workers", "0"])
    assert listed.exit_code == 0, listed.output
    assert list(np.load(out)["slide_id"]) == ["nompp"] * 2


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
    from midnight_train.outputs.embed import iter_encoded

    problems: list[str] = []  # labelled tile sets (eval, periodic eval) take no whole slides
    assert list(iter_encoded([str(slide_dir / "generic40x.tiff")], problems.append, slides=False)) == []
    assert len(problems) == 1 and "a whole slide, not a tile image" in problems[0]

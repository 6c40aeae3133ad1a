"""`midnight-train data preview` and `data inspect` on a slide source (online patching): a sheet
of tiles drawn from the real CMU slide or a synthetic 40x pyramid, and acceptance per µm/px and per slide over a fixed
number of draws from the CMU slide, a synthetic 40x pyramid and slides that must be dropped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shardkit
import yaml
from click.testing import CliRunner
from PIL import Image

from midnight_train.cli import main

SMALL = {"global_crop_size": 56, "local_crop_size": 28, "n_local_crops": 4, "num_workers": 0}


def write_config(path, data: dict) -> str:
    path.write_text(yaml.safe_dump({"data": {**SMALL, **data}}))
    return str(path)


@pytest.mark.parametrize("which", ["cmu", "synthetic40x"])
def test_preview_draws_tissue_tiles_from_a_slide(tmp_path, cmu_slide, slide_dir, which):
    slide = cmu_slide if which == "cmu" else slide_dir / "generic40x.tiff"
    config = write_config(tmp_path / "train.yaml", {"slides": str(slide), "tiles": {"tile_size": 96}})
    out = tmp_path / "preview.png"
    result = CliRunner().invoke(main, ["data", "preview", "--config", config, "--out", str(out),
                                       "--samples", "3"])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out))
    # as for shards: a 12 px header of column names, 3 rows of 56 px cells + 4 px padding;
    # original + 2 globals + 2 columns of locals
    assert grid.shape == (12 + 4 + 3 * 60, 4 + 3 * 60 + 2 * 30, 3)
    for row in range(3):
        original = grid[16 + 60 * row: 72 + 60 * row, 4:60].astype(float)
        assert original.std() > 10 and original.mean() < 235  # tissue, not glass
    again = tmp_path / "again.png"
    CliRunner().invoke(main, ["data", "preview", "--config", config, "--out", str(again), "--samples", "3"])
    assert np.array_equal(np.asarray(Image.open(again)), grid)  # the draws are seeded


def test_inspect_reports_acceptance_per_mpp_and_slide(tmp_path, cmu_slide, slide_dir):
    slides = [str(cmu_slide), str(slide_dir / "generic40x.tiff"), str(slide_dir / "glass.tiff"),
              str(slide_dir / "nompp.tiff")]
    config = write_config(tmp_path / "train.yaml", {"slides": slides, "tiles": {"tile_size": 64},
                                                    "slide_pool": 4, "draws_per_slide": 4})
    runner = CliRunner()
    result = runner.invoke(main, ["data", "inspect", "--config", config, "--samples", "60", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["kind"] == "slides" and info["draws"] == 60 and info["tile_sizes"] == {"64x64": 60}
    assert info["datasets"] == [{"name": "default", "weight": 1.0, "slides": 4, "drawn": 60}]
    assert set(info["per_mpp"]) == {"2", "1", "0.5", "0.25"}
    for rates in [*info["per_mpp"].values(), *info["slides"]]:
        assert rates["candidates"] == rates["accepted"] + rates["foreground"] + rates["hsv"] + rates["read_error"]
        assert rates["accepted"] <= rates["candidates"]
    assert sum(r["accepted"] for r in info["per_mpp"].values()) == info["total"]["accepted"] == 60
    assert sum(s["candidates"] for s in info["slides"]) == info["total"]["candidates"]
    seen = {s["slide_id"]: s for s in info["slides"]}
    assert set(seen) == {"CMU-1-Small-Region", "generic40x"}
    assert seen["CMU-1-Small-Region"]["cannot_give_mpp"] == [0.25]  # a 20x slide
    assert "0.25" not in seen["CMU-1-Small-Region"]["per_mpp"]
    assert seen["generic40x"]["cannot_give_mpp"] == []
    reasons = {d["slide_id"]: d["reason"] for d in info["dropped"]}
    assert set(reasons) == {"glass", "nompp"} and info["counters"]["slide_error"] == 2
    assert "no tissue" in reasons["glass"] and "µm/px" in reasons["nompp"]

    text = runner.invoke(main, ["data", "inspect", "--config", config, "--samples", "60"])
    assert text.exit_code == 0, text.output
    total = info["total"]
    assert f"   all {total['candidates']:>10} {total['accepted']:>8}" in text.output
    assert "per slide (2 seen)" in text.output and "slides dropped: 2" in text.output
    assert "256x256" not in text.output and "64x64 60" in text.output


def test_inspect_takes_a_source_or_a_config(tmp_path, cmu_slide):
    shardkit.make_shards(tmp_path / "a" / "shards", cmu_slide, n_shards=1, per_shard=3, tile_size=32)
    shardkit.make_shards(tmp_path / "b" / "shards", cmu_slide, n_shards=2, per_shard=2, tile_size=32)
    config = write_config(tmp_path / "train.yaml", {"datasets": [
        {"name": "a", "shards": str(tmp_path / "a")}, {"name": "b", "shards": str(tmp_path / "b")}]})
    runner = CliRunner()
    result = runner.invoke(main, ["data", "inspect", "--config", config])
    assert result.exit_code == 0, result.output
    assert "dataset a:\nsource:" in result.output and "dataset b:\nsource:" in result.output
    assert "shards: 2" in result.output
    neither = runner.invoke(main, ["data", "inspect"])
    both = runner.invoke(main, ["data", "inspect", str(tmp_path / "a"), "--config", config])
    assert neither.exit_code == both.exit_code == 2 and "SOURCE or a --config" in both.output
    missing = write_config(tmp_path / "missing.yaml", {"slides": str(tmp_path / "nothing.svs")})
    result = runner.invoke(main, ["data", "inspect", "--config", missing])
    assert result.exit_code == 1 and "nothing.svs" in result.output and "Traceback" not in result.output


def test_inspect_and_preview_take_overrides_with_a_config(tmp_path, cmu_slide):
    config = write_config(tmp_path / "train.yaml", {"shards": str(tmp_path / "no-shards")})
    runner = CliRunner()
    args = ["--config", config, f"data.slides={cmu_slide}", "data.tiles.tile_size=64"]
    result = runner.invoke(main, ["data", "inspect", *args, "--samples", "20", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["kind"] == "slides" and info["tile_sizes"] == {"64x64": 20}
    out = tmp_path / "p.png"
    result = runner.invoke(main, ["data", "preview", *args, "--out", str(out), "--samples", "2"])
    assert result.exit_code == 0 and out.exists(), result.output
    typo = runner.invoke(main, ["data", "inspect", *args, "data.tiles.tile_sise=64"])
    assert typo.exit_code == 2 and "data.tiles.tile_sise" in typo.output
    no_config = runner.invoke(main, ["data", "inspect", f"data.slides={cmu_slide}"])
    assert no_config.exit_code == 2 and "need a --config" in no_config.output

"""`midnight-train data preview` writes the augmentation grid from real shards; `data inspect`
summarises a shard source."""

from __future__ import annotations

import json

import numpy as np
import shardkit
import yaml
from click.testing import CliRunner
from PIL import Image

from midnight_train.cli import main


def test_preview_writes_grid_of_originals_and_crops(tmp_path, cmu_slide):
    shardkit.make_shards(tmp_path / "out" / "shards", cmu_slide, n_shards=1, per_shard=8, tile_size=96)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"data": {"shards": "ignored", "global_crop_size": 56, "local_crop_size": 28,
                                               "n_local_crops": 4}, "augment": {"hed_sigma_alpha": 0.3}}))
    out = tmp_path / "preview.png"
    result = CliRunner().invoke(main, ["data", "preview", str(tmp_path / "out"), "--config", str(config),
                                       "--out", str(out), "--samples", "3"])
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out))
    # a 12 px header naming the columns, 3 rows of 56 px cells + 4 px padding; original + 2
    # globals + 2 columns of 2 locals (26 px)
    assert grid.shape == (12 + 4 + 3 * 60, 4 + 3 * 60 + 2 * 30, 3)
    for column in range(4):  # each column's name is written above it in black
        assert (grid[:12, 4 + 60 * column:60 + 60 * column] < 60).all(axis=2).sum() > 10
    original = grid[16:72, 4:60].astype(float)
    assert original.std() > 10 and original.mean() < 235  # tissue, not blank
    globals_ = grid[16:72, 64:180].astype(float)
    assert globals_.std() > 10
    zero = CliRunner().invoke(main, ["data", "preview", str(tmp_path / "out"), "--config", str(config),
                                     "--out", str(tmp_path / "zero.png"), "--samples", "0"])
    assert zero.exit_code == 2 and "--samples" in zero.output and zero.exception is not None
    assert isinstance(zero.exception, SystemExit) and not (tmp_path / "zero.png").exists()


def test_preview_requires_a_source(tmp_path):
    result = CliRunner().invoke(main, ["data", "preview", "--out", str(tmp_path / "p.png")])
    assert result.exit_code != 0 and "SOURCE" in result.output


def test_inspect_counts_shards_samples_groups_mpp_and_damage(tmp_path, cmu_slide):
    out = tmp_path / "out"
    paths = shardkit.make_shards(out / "shards", cmu_slide, n_shards=2, per_shard=5, tile_size=32, group="nki")
    good = shardkit.read_tar(paths[0])
    shardkit.write_tar(out / "shards" / "damaged.tar", [
        ("bad_jpeg", {"jpg": b"not a jpeg", "json": good[0][1]["json"]}),
        ("bad_json", {"jpg": good[1][1]["jpg"], "json": b"{oops"}),
        ("no_jpg", {"json": b"{}"}),
    ])
    runner = CliRunner()
    # no manifests: every *.tar below the directory, counted by reading
    result = runner.invoke(main, ["data", "inspect", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["shards"] == 3 and info["samples"]["from"] == "reading"
    assert sorted(info["samples"]["per_shard"].values()) == [2, 5, 5]  # the member without .jpg is skipped
    assert info["first_samples"] == 12
    assert info["groups"] == {"nki": 11, "None": 1} and info["mpp"] == {str(shardkit.MPP): 11, "None": 1}
    assert info["skipped"]["decode_error"] == 1 and info["skipped"]["bad_json"] == 1
    assert info["tile_sizes"] == {"32x32": 11}  # every decodable JPEG
    assert info["skipped"]["malformed"] >= 1
    # with the builder's manifests: counts come from them, and the human-readable form
    shardkit.write_manifest(out, 0, paths, [5, 5])
    result = runner.invoke(main, ["data", "inspect", str(out), "--samples", "3"])
    assert result.exit_code == 0, result.output
    assert "shards: 2" in result.output and "(from manifests): min 5, mean 5.0, max 5; total 10" in result.output
    assert "first 3 samples: groups: nki 3 (100%)" in result.output
    assert f"µm/px: {shardkit.MPP} 3 (100%)" in result.output and "decode_error 0" in result.output
    assert "tile sizes: 32x32 3 (100%)" in result.output and "warning" not in result.output
    shardkit.make_shards(out / "shards", cmu_slide, n_shards=1, per_shard=2, tile_size=48, prefix="big")
    mixed = runner.invoke(main, ["data", "inspect", str(out / "shards")])
    assert "32x32" in mixed.output and "48x48" in mixed.output
    assert "warning: tiles of different sizes" in mixed.output
    missing = runner.invoke(main, ["data", "inspect", str(tmp_path / "nothing-")])
    assert missing.exit_code != 0 and "no shards found" in missing.output


def test_preview_reads_the_config_as_fit_does(tmp_path, cmu_slide):
    """Unknown keys are refused with their names (no traceback), and YAML's string "1e-2" is a
    number, exactly as `fit` reads the same file."""
    shardkit.make_shards(tmp_path / "out" / "shards", cmu_slide, n_shards=1, per_shard=4, tile_size=64)
    small = {"global_crop_size": 28, "local_crop_size": 14, "n_local_crops": 2}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"shards": "x", **small}, "augment": {"hed_sigma_gamma": 1}}))
    result = CliRunner().invoke(main, ["data", "preview", str(tmp_path / "out"), "--config", str(bad),
                                       "--out", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "hed_sigma_gamma" in result.output
    assert "Traceback" not in result.output
    good = tmp_path / "good.yaml"
    good.write_text("data:\n  shards: x\n  global_crop_size: 28\n  local_crop_size: 14\n"
                    "  n_local_crops: 2\naugment:\n  hed_sigma_beta: 1e-2\n")
    result = CliRunner().invoke(main, ["data", "preview", str(tmp_path / "out"), "--config", str(good),
                                       "--out", str(tmp_path / "p.png"), "--samples", "2"])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "p.png").size == (4 + 3 * 32 + 1 * 16, 12 + 4 + 2 * 32)  # locals 12 px


def test_both_commands_accept_dash_h():
    from midnight_prep.cli import main as prep_main

    for cli in (main, prep_main):
        result = CliRunner().invoke(cli, ["-h"])
        assert result.exit_code == 0 and "Usage:" in result.output
    fit_help = CliRunner().invoke(main, ["fit", "-h"]).output
    assert "\n  midnight-train fit examples/tiny-cpu.yaml" in fit_help  # example lines kept apart

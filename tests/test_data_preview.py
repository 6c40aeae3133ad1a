"""`midnight-train data preview` writes the augmentation grid from real shards."""

from __future__ import annotations

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
    # 3 rows of 56 px cells + 4 px padding; original + 2 globals + 2 columns of 2 locals (26 px)
    assert grid.shape == (4 + 3 * 60, 4 + 3 * 60 + 2 * 30, 3)
    original = grid[4:60, 4:60].astype(float)
    assert original.std() > 10 and original.mean() < 235  # tissue, not blank
    globals_ = grid[4:60, 64:180].astype(float)
    assert globals_.std() > 10


def test_preview_requires_a_source(tmp_path):
    result = CliRunner().invoke(main, ["data", "preview", "--out", str(tmp_path / "p.png")])
    assert result.exit_code != 0 and "SOURCE" in result.output

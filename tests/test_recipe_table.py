"""The recipe table (`midnight-train recipe`, every run's recipe.md/json): the Midnight example
configs hold the paper's stated numbers, and the table marks what differs from each source."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from midnight_train.cli import main
from midnight_train.config import load_config
from midnight_train.method.recipe import recipe_rows

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def by_setting(rows):
    return {r.setting: r for r in rows}


@pytest.mark.parametrize("name", ["midnight-12k", "midnight-92k"])
def test_midnight_configs_hold_the_papers_numbers(name):
    cfg = load_config(EXAMPLES / f"{name}.yaml")
    tiles = cfg.data.tile_params() if cfg.data.source_kind() == "slides" else None
    assert cfg.train.max_steps == 1_000_000 and cfg.train.base_lr == pytest.approx(3.5e-4)
    assert (cfg.data.batch_size, cfg.train.grad_accum) == (12, 2)  # x 32 GPUs = 768
    assert cfg.model.arch == "vit_giant_patch14_dinov2" and cfg.model.pretrained
    assert tiles is not None and tiles.tile_size == 256 and tiles.foreground == 0.4
    assert list(tiles.mpps) == [2.0, 1.0, 0.5, 0.25] and tiles.hsv_min_fraction == 0.6
    assert cfg.loss.kde_weight > 0 and cfg.loss.koleo_weight == 0
    assert list(cfg.augment.mean) == [0.5] * 3 and list(cfg.augment.std) == [0.5] * 3
    rows = recipe_rows(cfg, gpus=32)
    assert [r.setting for r in rows if r.differs_from_paper] == []


def test_high_res_config_holds_the_papers_numbers():
    cfg = load_config(EXAMPLES / "midnight-highres.yaml")
    tiles = cfg.data.tile_params()
    assert tiles.tile_size == 512 and list(tiles.mpps) == [1.0, 0.5, 0.25, 0.125]
    assert (cfg.data.global_crop_size, cfg.data.local_crop_size, cfg.model.img_size) == (392, 168, 392)
    assert (cfg.data.batch_size, cfg.train.grad_accum) == (6, 4)  # x 48 GPUs = 1152
    assert cfg.train.base_lr == pytest.approx(1e-4) and cfg.train.max_steps == 120_000
    rows = recipe_rows(cfg, gpus=48)
    assert [r.setting for r in rows if r.differs_from_paper] == []


def test_the_table_marks_differences_and_silence():
    cfg = load_config(EXAMPLES / "midnight-12k.yaml", ["train.base_lr=2e-4",
                                                        "augment.blur_convention=dinov2_released"])
    rows = by_setting(recipe_rows(cfg, gpus=32))
    lr = rows["base lr (for a batch of 1024)"]
    assert lr.differs_from_paper and not lr.differs_from_dinov2 and lr.marks() == "≠ paper"
    blur = rows["blur p: global 1 / global 2 / local"]
    assert blur.ours == pytest.approx([0.0, 0.9, 0.5]) and not blur.differs_from_dinov2
    assert blur.paper_silent and blur.marks() == "paper silent"
    assert rows["peak lr"].ours == pytest.approx(2e-4 * (384 / 1024) ** 0.5)
    for setting in ("drop path in every block (uniform)", "gradient clipping (per part)",
                    "iBOT head: prototypes / bottleneck", "last layer"):
        assert not rows[setting].differs_from_dinov2, setting  # the ViT-g configs match DINOv2
    assert rows["warm-up (share of iterations)"].differs_from_dinov2  # stated in the config
    assert rows["position grid for other crop sizes"].differs_from_dinov2
    default = by_setting(recipe_rows(load_config(EXAMPLES / "midnight-12k.yaml")))
    assert "peak lr" not in default and str(default["GPUs"].ours) == "as launched"


def test_recipe_command_prints_markdown_and_json():
    runner = CliRunner()
    md = runner.invoke(main, ["recipe", str(EXAMPLES / "midnight-12k.yaml"), "--gpus", "32"])
    assert md.exit_code == 0, md.output
    assert "| | setting | this config | Midnight paper | DINOv2 ViT-g/14 |" in md.output
    assert "0 differ from the paper" in md.output
    js = runner.invoke(main, ["recipe", str(EXAMPLES / "midnight-12k.yaml"), "train.max_steps=10",
                              "--json"])
    assert js.exit_code == 0, js.output
    data = json.loads(js.output)
    iters = next(r for r in data["rows"] if r["setting"] == "iterations")
    assert iters == {**iters, "ours": 10, "paper": 1_000_000, "differs_from_paper": True}
    bad = runner.invoke(main, ["recipe", str(EXAMPLES / "midnight-12k.yaml"), "train.nope=1"])
    assert bad.exit_code == 2 and "train.nope" in bad.output

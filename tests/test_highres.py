"""The high-resolution post-training stage end to end on CPU, at toy sizes with the paper's
ratios: train at a small crop size, continue from that model's export on larger tiles with larger
global/local crops (position grids resampled, teacher and student both), export at the new size,
embed."""

from __future__ import annotations

import json

import numpy as np
import shardkit
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from midnight_train.cli import main
from midnight_train.outputs.export import read_metadata

TINY = "examples/tiny-cpu.yaml"


def fit(*overrides: str) -> None:
    result = CliRunner().invoke(main, ["fit", TINY, "train.max_steps=2", "train.checkpoint_every=2",
                                       "train.tensorboard=false", "train.progress=false",
                                       "data.num_workers=0", *overrides])
    assert result.exit_code == 0, result.output


def test_low_res_then_high_res_then_export_and_embed(tmp_path, cmu_slide, monkeypatch):
    monkeypatch.chdir(shardkit.Path(__file__).resolve().parents[1])
    low = shardkit.make_shards(tmp_path / "low", cmu_slide, n_shards=1, per_shard=16, tile_size=64)
    high = shardkit.make_shards(tmp_path / "high", cmu_slide, n_shards=1, per_shard=16, tile_size=128)
    # stage 1: 56 px global crops (4x4 patches of 14 px)
    fit(f"data.shards={low[0]}", f"output_dir={tmp_path / 'stage1'}")
    exported = tmp_path / "stage1-export"
    assert CliRunner().invoke(main, ["export", str(tmp_path / "stage1"), str(exported)]).exit_code == 0
    # stage 2: 2x larger tiles, crops in the paper's ratios (512 px tiles, 392/168 crops: here
    # 128 px tiles, 98/42 crops, 7x7 and 3x3 patches)
    fit(f"data.shards={high[0]}", f"output_dir={tmp_path / 'stage2'}", f"model.pretrained={exported / 'model.safetensors'}",
        "model.img_size=98", "data.global_crop_size=98", "data.local_crop_size=42",
        "train.base_lr=1e-4")
    recipe = json.loads((tmp_path / "stage2" / "recipe.json").read_text())  # each run's recipe
    crops = {r["setting"]: r for r in recipe["rows"]}["global crops: size (px)"]
    assert crops["ours"] == 98 and crops["paper"] == 224 and crops["differs_from_paper"]
    final = tmp_path / "final"
    result = CliRunner().invoke(main, ["export", str(tmp_path / "stage2"), str(final), "--img-size", "98"])
    assert result.exit_code == 0, result.output
    weights = load_file(str(final / "model.safetensors"))
    assert weights["pos_embed"].shape[1] == 1 + 7 * 7  # 98 / 14 = 7 patches a side
    start = load_file(str(exported / "model.safetensors"))
    assert start["pos_embed"].shape[1] == 1 + 4 * 4
    assert not torch.equal(weights["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])
    assert '"img_size": 98' in read_metadata(final)["timm_kwargs"]
    out = tmp_path / "emb.npz"
    result = CliRunner().invoke(main, ["embed", str(final), str(high[0]), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    emb = np.load(out)["embeddings"]
    assert emb.shape == (16, 128) and np.isfinite(emb).all()

"""An export folder is all a user needs: plain timm, in a process that cannot import midnight,
loads it with the right input size and normalisation, and gives the same CLS+Mean embeddings as
`midnight-train embed` on real tiles."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import shardkit
from click.testing import CliRunner
from PIL import Image

from midnight_train.cli import main

PLAIN_TIMM = r"""
import importlib.abc, json, sys

class NoMidnight(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("midnight_train", "midnight_prep"):
            raise ImportError(f"{name} must not be needed")
sys.meta_path.insert(0, NoMidnight())

import numpy as np, timm, torch
from PIL import Image

folder, tiles, out = sys.argv[1:4]
model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**config)
embeddings = []
with torch.no_grad():
    for path in json.loads(tiles):
        tokens = model.forward_features(transform(Image.open(path).convert("RGB"))[None])
        embeddings.append(torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(1)], -1))
np.save(out, torch.cat(embeddings).numpy())
print(json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}))
"""


@pytest.mark.parametrize("img_size", [None, 42])
def test_plain_timm_loads_the_folder_and_embeds_as_we_do(tmp_path, cmu_slide, img_size):
    from train_fakes import make_trainer, tiny_config

    from midnight_train.method.augment import AugmentConfig

    cfg = tiny_config(tmp_path / "run", train={"max_steps": 1, "checkpoint_every": 1})
    cfg.augment = AugmentConfig()  # Midnight's normalisation, 0.5 / 0.5
    make_trainer(cfg).fit()
    folder = tmp_path / "export"
    args = ["export", str(tmp_path / "run"), str(folder)] + (["--img-size", str(img_size)] if img_size else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json", "README.md",
                                                 "training_config.json"}
    size = img_size or 28
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch14_dinov2" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["input_size"] == [3, size, size]
    card = (folder / "README.md").read_text()
    assert "CLS+Mean" in card and "local-dir:export" in card and "Licence" in card
    # real tiles written as PNG files: both sides decode the same pixels
    tiles = []
    for i, tile in enumerate(shardkit.tissue_tiles(cmu_slide, 5, size=64, seed=1)):
        tiles.append(str(tmp_path / f"tile{i}.png"))
        Image.fromarray(tile).save(tiles[-1])
    plain = tmp_path / "plain.npy"
    done = subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(folder), json.dumps(tiles), str(plain)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    data_config = json.loads(done.stdout.strip().splitlines()[-1])
    assert data_config["input_size"] == [3, size, size]
    assert data_config["mean"] == [0.5] * 3 and data_config["std"] == [0.5] * 3
    assert data_config["interpolation"] == "bicubic" and data_config["crop_pct"] == 1.0
    ours = tmp_path / "ours.npz"
    result = CliRunner().invoke(main, ["embed", str(folder), *tiles, "--out", str(ours), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert np.allclose(np.load(ours)["embeddings"], np.load(plain), atol=1e-4)


def test_export_refuses_a_foreign_folder_and_a_size_the_model_cannot_take(tmp_path, tiny_export):
    run = tiny_export.parent / "run"  # the fixture's training run
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["export", str(run), str(foreign)])
    assert result.exit_code == 1 and "not empty and not an earlier export (notes.txt)" in result.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    earlier = tmp_path / "earlier"
    assert CliRunner().invoke(main, ["export", str(run), str(earlier)]).exit_code == 0
    (earlier / "eval.json").write_text("{}")
    again = CliRunner().invoke(main, ["export", str(run), str(earlier)])
    assert again.exit_code == 0 and "kept its other files: eval.json" in again.output
    for size in ("50", "7"):
        result = CliRunner().invoke(main, ["export", str(run), str(tmp_path / f"at{size}"), "--img-size", size])
        assert result.exit_code == 1 and "patch size 14" in result.output, result.output
        assert not (tmp_path / f"at{size}").exists()


def test_model_card_names_its_data_on_the_line_that_announces_it(tmp_path):
    from midnight_train.outputs.model_card import model_card

    (tmp_path / "out" / "manifests").mkdir(parents=True)
    (tmp_path / "out" / "manifests" / "job-000000.json").write_text(json.dumps(
        {"samples": 1200, "slides": [{"slide_id": "a", "written": {"0.5": 1000, "1": 200}}]}))
    common = dict(name="m", arch="vit_small_patch14_dinov2", img_size=224, num_features=384,
                  mean=[0.5] * 3, std=[0.5] * 3, which="teacher", step=3)
    for data, line in (({"shards": str(tmp_path / "out")},
                        "- Data (shards): 1,200 tiles from 1 slides (0.5 µm/px: 1,000, 1 µm/px: 200)"),
                       ({"slides": ["slides.csv"]}, "- Data (slides, tiles cut during training): `slides.csv`"),
                       ({"datasets": [{"name": "x", "slides": "s/"}, {"name": "y", "shards": str(tmp_path / "no")}]},
                        "- Data (shards): `" + str(tmp_path / "no") + "`\n  - `")):
        card = model_card(config={"data": data}, **common)
        assert line in card, card
        assert not [row for row in card.splitlines() if row.startswith("- Data") and row.endswith(":")]

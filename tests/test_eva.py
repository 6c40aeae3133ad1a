"""kaiko's eva (the benchmark suite of the Midnight paper) evaluates an export folder: our eva
configs parse with eva's own command line, and the backbone they name, built by eva's
ModelFromFunction and fed by eva's ResizeAndCrop (mean = std = 0.5), returns the same CLS+Mean
embeddings as `midnight-train embed`. (The benchmark data sets themselves download from the
internet: only local images here.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shardkit
import torch
from click.testing import CliRunner
from PIL import Image

from midnight_train.cli import main

pytest.importorskip("eva", reason="kaiko-eva is the optional .[eval] extra (bin/setup installs it)")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "eva"


@pytest.fixture(scope="module")
def midnight_export(tmp_path_factory):
    from train_fakes import make_trainer, tiny_config

    from midnight_train.method.augment import AugmentConfig
    from midnight_train.outputs.export import export_backbone

    tmp = tmp_path_factory.mktemp("eva")
    cfg = tiny_config(tmp / "run", train={"max_steps": 1, "checkpoint_every": 1})
    cfg.augment = AugmentConfig()
    make_trainer(cfg).fit()
    return export_backbone(tmp / "run", tmp / "export")


def test_eva_parses_our_config(midnight_export, tmp_path):
    """One eva start costs ~15 s here: the 10-shot config (binary head, balanced sampler) is the
    one with the most parts; the others share its form."""
    task = "pcam_10shot"
    env = {**os.environ, "MIDNIGHT_EXPORT": str(midnight_export), "HF_HUB_OFFLINE": "1",
           "IN_FEATURES": subprocess.check_output(
               [sys.executable, "-m", "midnight_train.outputs.eva_backbone", str(midnight_export)], text=True).strip()}
    assert env["IN_FEATURES"] == "64"
    done = subprocess.run([sys.executable, "-m", "eva", "predict_fit", "--config",
                           str(EXAMPLES / f"{task}.yaml"), "--print_config"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "path: midnight_train.outputs.eva_backbone.backbone" in done.stdout
    assert f"export: {midnight_export}" in done.stdout and "- 0.5" in done.stdout


def test_eva_backbone_embeds_local_images_as_we_do(midnight_export, tmp_path, cmu_slide):
    from eva.core.models import ModelFromFunction
    from eva.vision.data.transforms.common import ResizeAndCrop
    from torchvision import tv_tensors

    from midnight_train.outputs.eva_backbone import backbone

    tiles = shardkit.tissue_tiles(cmu_slide, 4, size=28, seed=2)  # the export's input size
    paths = []
    for i, tile in enumerate(tiles):
        paths.append(str(tmp_path / f"t{i}.png"))
        Image.fromarray(tile).save(paths[-1])
    model = ModelFromFunction(path=backbone, arguments={"export": str(midnight_export)})
    transform = ResizeAndCrop(size=28, mean=[0.5] * 3, std=[0.5] * 3)
    x = torch.stack([transform(tv_tensors.Image(torch.from_numpy(t).permute(2, 0, 1))) for t in tiles])
    with torch.no_grad():
        eva_embeddings = model(x).numpy()
    assert eva_embeddings.shape == (4, 64)
    out = tmp_path / "ours.npz"
    result = CliRunner().invoke(main, ["embed", str(midnight_export), *paths, "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert np.allclose(np.load(out)["embeddings"], eva_embeddings, atol=1e-5)

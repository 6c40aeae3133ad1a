"""The example configs load, and train as the published Midnight models were: inputs normalised
with mean = std = 0.5, which travels into the export's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from midnight_train.config import load_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_examples_normalise_like_midnight(path):
    cfg = load_config(path, ["data.shards=/data/x.tar"])
    assert list(cfg.augment.mean) == [0.5] * 3 and list(cfg.augment.std) == [0.5] * 3


def test_normalisation_travels_into_the_export_and_embed(tmp_path):
    from train_fakes import make_trainer, tiny_config

    from midnight_train.augment import AugmentConfig
    from midnight_train.embed import Embedder
    from midnight_train.export import export_backbone, read_metadata

    assert list(AugmentConfig().mean) == [0.5] * 3  # the default too
    cfg = tiny_config(tmp_path / "run", train={"max_steps": 1, "checkpoint_every": 1})
    cfg.augment = AugmentConfig(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    make_trainer(cfg).fit()
    out = export_backbone(tmp_path / "run", tmp_path / "m")
    meta = read_metadata(out)
    assert json.loads(meta["mean"]) == [0.1, 0.2, 0.3] and json.loads(meta["std"]) == [0.4, 0.5, 0.6]
    embedder = Embedder(out)
    assert embedder.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert embedder.std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])

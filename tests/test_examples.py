"""The example configs load, and train as the published Midnight models were: from the slides by
online patching (tcga-100M, the ablation, from shards), inputs normalised with mean = std = 0.5,
which travels into the export's metadata."""

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

    from midnight_train.method.augment import AugmentConfig
    from midnight_train.outputs.embed import Embedder
    from midnight_train.outputs.export import export_backbone, read_metadata

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


def test_paper_models_train_from_slides_and_the_ablation_from_shards(tmp_path, cmu_slide):
    from midnight_train.data.slide_stream import tile_sampler

    data = {p.stem: load_config(p).data for p in EXAMPLES}
    assert {name for name, d in data.items() if d.source_kind() == "slides"} == {
        "midnight-12k", "midnight-92k", "midnight-highres"}
    assert data["tcga-100M"].source_kind() == "shards"
    assert [(d["name"], d["weight"]) for d in data["midnight-92k"].datasets] == [("tcga", 0.5), ("nki80k", 0.5)]
    for name, size, mpps in (("midnight-12k", 256, (2, 1, 0.5, 0.25)), ("midnight-92k", 256, (2, 1, 0.5, 0.25)),
                             ("midnight-highres", 512, (1, 0.5, 0.25, 0.125))):
        params = data[name].tile_params()
        assert (params.tile_size, params.mpps, params.foreground) == (size, mpps, 0.4), name
    # Midnight-12k's data section draws real tiles from a stand-in slide list.
    cfg = load_config(EXAMPLES[0].parent / "midnight-12k.yaml",
                      [f"data.slides={cmu_slide}", f"data.mask_cache_dir={tmp_path}"])
    with tile_sampler(cfg.data) as sampler:
        tiles = [sampler.draw() for _ in range(4)]
    assert all(t.rgb.shape == (256, 256, 3) and t.mpp in (2, 1, 0.5) for t in tiles)
    assert list(tmp_path.glob("*.npz"))  # the mask went to the cache directory


def test_gpu_configs_log_every_20_steps_and_checkpoint_activations_where_measured():
    """Set by measurement (BENCHMARKS.md, "Training step memory"): ViT-g/14 at 224 px fits an
    80 GB GPU without activation checkpointing (43 GiB traced), the 392 px stage does not
    comfortably (57.5 GiB); logging gathers from every process, so GPU runs log every 20 steps."""
    cfgs = {p.stem: load_config(p, ["data.shards=/data/x.tar"]) for p in EXAMPLES}
    gpu = {name: c for name, c in cfgs.items() if name != "tiny-cpu"}
    assert all(c.train.log_every >= 20 for c in gpu.values())
    assert {name: c.model.grad_checkpointing for name, c in gpu.items()
            if "giant" in c.model.arch} == {"midnight-12k": False, "midnight-92k": False,
                                            "tcga-100M": False, "midnight-highres": True}


def test_vitg_configs_drop_paths_uniformly_as_dinov2():
    giant = [load_config(p, ["data.shards=/data/x.tar"]).model for p in EXAMPLES]
    giant = [m for m in giant if "giant" in m.arch]
    assert len(giant) == 4 and all(m.drop_path_uniform and m.drop_path_rate == 0.4 for m in giant)

"""Config files, dotted overrides, unknown keys, and the example configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from midnight_train.config import load_config, save_config
from midnight_train.typed_yaml import ConfigError

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.max_steps >= 1 and cfg.model.arch.endswith("dinov2")
    assert cfg.data.global_crop_size == cfg.model.img_size


def test_required_override_names(tmp_path):
    cfg = load_config(EXAMPLES[0].parent / "midnight-12k.yaml", [
        f"output_dir={tmp_path}", "data.shards=/data/train-{000000..000009}.tar",
        "train.max_steps=20", "train.seed=3", "train.checkpoint_every=5",
        "loss.dino_weight=0", "loss.ibot_weight=0.5", "loss.kde_weight=1e-2",
        "loss.koleo_weight=0.1", "resume=auto", "model.timm_kwargs.depth=2"])
    assert cfg.output_dir == str(tmp_path) and cfg.resume == "auto"
    assert cfg.data.shards == "/data/train-{000000..000009}.tar"
    assert (cfg.train.max_steps, cfg.train.seed, cfg.train.checkpoint_every) == (20, 3, 5)
    assert cfg.loss.dino_weight == 0.0 and cfg.loss.kde_weight == 0.01
    assert cfg.loss.koleo_weight == 0.1 and isinstance(cfg.train.base_lr, float)
    assert cfg.model.timm_kwargs == {"depth": 2}
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_data_shards_override_replaces_dataset_mix():
    cfg = load_config(EXAMPLES[0].parent / "midnight-92k.yaml", ["data.shards=/x"])
    assert cfg.data.shards == "/x" and cfg.data.datasets is None
    mixed = load_config(EXAMPLES[0].parent / "midnight-92k.yaml")
    assert [d["weight"] for d in mixed.data.datasets] == [0.5, 0.5]


@pytest.mark.parametrize("override", ["train.max_stepz=3", "lossy.kde_weight=1",
                                      "data.batchsize=3", "augment.hed=1", "model.archh=x"])
def test_unknown_keys_are_errors(override):
    with pytest.raises((ConfigError, TypeError, ValueError), match="unknown|unexpected"):
        load_config(EXAMPLES[0].parent / "tiny-cpu.yaml", [override])


def test_bad_values_are_errors(tmp_path):
    with pytest.raises(ConfigError):
        load_config(EXAMPLES[0].parent / "tiny-cpu.yaml", ["train.max_steps=many"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"unknown": 1}, "data": {"shards": "x"}}))
    with pytest.raises(ConfigError, match="train.unknown"):
        load_config(path)


@pytest.mark.parametrize("override, key", [
    ("train.base_lr=0", "train.base_lr=0.0"), ("train.base_lr=-1e-3", "train.base_lr=-0.001"),
    ("train.checkpoint_every=0", "train.checkpoint_every=0"),
    ("train.log_every=0", "train.log_every=0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0"),
    ("model.arch=vit_no_such_model", "model.arch='vit_no_such_model'"),
    ("train.lr_scaling_batch=global", "train.lr_scaling_batch='global'"),
    ("augment.blur_convention=inverted", "augment.blur_convention='inverted'"),
])
def test_values_that_would_fail_later_are_errors_now(override, key):
    with pytest.raises(ConfigError, match=f"invalid value: {re.escape(key)} "):
        load_config(EXAMPLES[0].parent / "tiny-cpu.yaml", [override])


def test_saved_config_never_carries_the_switches_of_one_invocation(tmp_path):
    cfg = load_config(EXAMPLES[0].parent / "tiny-cpu.yaml",
                      ["overwrite=true", "resume_allow_changes=true", "resume=auto"])
    assert cfg.overwrite and cfg.resume_allow_changes
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert not again.overwrite and not again.resume_allow_changes and again.resume == "auto"


def test_resuming_a_run_saved_before_lr_scaling_batch_existed_is_a_change():
    """Runs saved before the key counted the accumulation; today's default does not, so such a
    resume must be refused as a change of lr, never continued at another lr."""
    from midnight_train.config import config_changes, run_config

    cfg = load_config(EXAMPLES[0].parent / "tiny-cpu.yaml")
    saved = run_config(cfg)
    assert config_changes(saved, cfg) == []
    del saved["train"]["lr_scaling_batch"]
    assert config_changes(saved, cfg) == ["train.lr_scaling_batch: 'accumulated' -> 'dinov2'"]


@pytest.mark.parametrize("overrides, said", [
    (["model.head_n_prototypes=0"], "model.head_n_prototypes=0 (must be > 0)"),
    (["loss.ibot_weight=-1"], "loss.ibot_weight=-1.0 (must be >= 0)"),
    (["loss.dino_weight=0", "loss.ibot_weight=0", "loss.kde_weight=0"], "at least one > 0"),
    (["data.mask_ratio_min_max=[0.1, 1.5]"], "data.mask_ratio_min_max=[0.1, 1.5]"),
    (["data.local_crop_size=30"], "data.local_crop_size=30 (must be a multiple of data.patch_size"),
    (["data.local_crop_size=70"], "<= data.global_crop_size"),
    (["model.arch=resnet50"], "model.arch='resnet50' (must be a timm VisionTransformer"),
    (["model.timm_kwargs.num_heads=5"], "timm cannot build it (AssertionError: dim should be "
                                        "divisible by num_heads)"),
    (["data.patch_size=28"], "data.patch_size=28 (must be the patch size of"),
    (["data.shards=null", "data.slides=x.svs", "data.tiles.tile_size=48"],
     "data.global_crop_size=56 (must be <= data.tiles.tile_size (48))"),
])
def test_model_loss_and_crop_values_are_checked_at_start(tmp_path, overrides, said):
    """One line naming the key, before the output folder exists (these trained zeros or failed
    with a traceback later)."""
    from click.testing import CliRunner

    from midnight_train.cli import main

    out = tmp_path / "run"
    done = CliRunner().invoke(main, ["fit", str(EXAMPLES[0].parent / "tiny-cpu.yaml"),
                                     f"output_dir={out}", *overrides])
    assert done.exit_code == 2 and said in done.output, done.output
    assert "Traceback" not in done.output and not out.exists()

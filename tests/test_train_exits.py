"""Every error path of `fit` ends the process and its loader workers within seconds, exit != 0
(workers block SIGTERM for preemption: an error that left them running hung the process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from shardkit import make_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny-cpu.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cmu_slide):
    out = tmp_path_factory.mktemp("shards")
    make_shards(out, cmu_slide, n_shards=2, per_shard=24, tile_size=112)
    return out


def fit(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """`midnight-train fit` in a subprocess; a hang fails the test (TimeoutExpired)."""
    return subprocess.run([sys.executable, "-m", "midnight_train", "fit", TINY,
                           "train.tensorboard=false", "train.progress=false", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def test_non_finite_loss_with_loader_workers_exits(shards, tmp_path):
    done = fit(f"data.shards={shards}", f"output_dir={tmp_path / 'run'}", "data.num_workers=2",
               "train.base_lr=1e9", "train.clip_grad=0")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "non-finite loss at step" in done.stderr and "Traceback" not in done.stderr


def test_an_evaluation_failure_with_loader_workers_exits(shards, tmp_path):
    one_class = tmp_path / "eval" / "only"
    one_class.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((56, 56, 3), 40 * i, np.uint8)).save(one_class / f"{i}.png")
    done = fit(f"data.shards={shards}", f"output_dir={tmp_path / 'run'}", "data.num_workers=2",
               "eval.every=2", "eval.methods=[knn]",
               f"eval.sets=[{{name: one, train: {tmp_path / 'eval'}, test: {tmp_path / 'eval'}}}]")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "two classes" in done.stderr and "Traceback" not in done.stderr


def test_a_slide_cache_too_small_for_the_loader_is_refused_at_start(cmu_slide, s3_env, tmp_path):
    """Three staged slides of 1.9 MB, 2 workers x 3 open slides: a 5 MB cache made workers wait
    for each other (then hang past the DataLoader timeout); refused at start with the number."""
    import fsspec

    fs = fsspec.filesystem("s3")
    for i in range(3):
        fs.put_file(str(cmu_slide), f"midnight/room/s{i}.svs")
    args = ["data.slides=s3://midnight/room/", f"data.stage_dir={tmp_path / 'stage'}",
            "data.slide_pool=1", "data.num_workers=2", "data.timeout_s=60", "train.max_steps=2"]
    done = fit(*args, "data.stage_max_gb=0.005", f"output_dir={tmp_path / 'small'}", timeout=60)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "data.stage_max_gb=0.01 or more" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "small" / "config.yaml").exists()
    assert not (tmp_path / "stage").exists() or not any((tmp_path / "stage").iterdir())
    done = fit(*args, "data.stage_max_gb=0.006", f"output_dir={tmp_path / 'room'}", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_same_shards_twice_are_refused(shards, tmp_path):
    """data.shards=[OUT, OUT] read every sample twice per epoch without a word."""
    from midnight_train.config import load_config
    from midnight_train.data.loader import make_loader

    def loader(*overrides: str):
        cfg = load_config(TINY, list(overrides)).data
        return make_loader(cfg, seed=0, rank=0, world_size=1)

    for source in (f"[{shards}, {shards}]", f"[{shards}, {shards}/./]",
                   f"[{shards}/shard-000000.tar, {shards}]"):
        with pytest.raises(ValueError, match="listed more than once .*shard-000000.tar"):
            loader(f"data.shards={source}")
    twice = [f"{{shards: {shards}, name: {n}}}" for n in "ab"]
    with pytest.raises(ValueError, match="dataset 'b' are listed more than once"):
        loader(f"data.datasets=[{', '.join(twice)}]")
    groups = [f"{{shards: {shards}, name: {n}, group: {n}}}" for n in "ab"]
    loader(f"data.datasets=[{', '.join(groups)}]")  # one shard set, two groups: fine
    loader(f"data.shards={shards}")

"""End to end on real shards (CMU tissue) with the real data pipeline and colour augmentation:
the CLI, a loss that goes down, exact resume, and a 2-process CPU (gloo) run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from shardkit import make_shards  # noqa: E402

from midnight_train.config import load_config  # noqa: E402
from midnight_train.loop import checkpoint  # noqa: E402
from midnight_train.loop.checkpoint import list_checkpoints  # noqa: E402
from midnight_train.loop.step import TIMING_METRICS  # noqa: E402
from midnight_train.loop.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-cpu.yaml"
STEPS = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cmu_slide):
    out = tmp_path_factory.mktemp("shards")
    make_shards(out, cmu_slide, n_shards=4, per_shard=24, tile_size=112)
    return out


def run_cli(*args, nproc: int = 1, timeout: int = 240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                 "--master_port", "29517", "-m", "midnight_train"] if nproc > 1
                else [sys.executable, "-m", "midnight_train"])
    done = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def overrides(shards, out, **extra):
    items = {"data.shards": str(shards), "output_dir": str(out), "train.max_steps": STEPS,
             "train.checkpoint_every": 5, "train.tensorboard": "false", **extra}
    return [f"{k}={v}" for k, v in items.items()]


def test_cli_fit_on_real_shards_then_resume_exactly(shards, tmp_path):
    full = tmp_path / "full"
    run_cli("fit", str(TINY), *overrides(shards, full))
    rows = metrics(full)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for k in ("loss", "loss_dino", "loss_ibot", "loss_kde", "grad_norm"):
            assert math.isfinite(r[k]), (r["step"], k)
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first
    assert [p.name for p in list_checkpoints(full)] == ["step_00000005", "step_00000010"]
    assert (full / "config.yaml").exists() and (full / "tensorboard").exists() is False

    # Interrupted after step 5 (in-process), continued with resume=auto: the same metrics.
    cut = tmp_path / "cut"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI run (OMP_NUM_THREADS=1): same float reductions
    try:
        Trainer(load_config(TINY, overrides(shards, cut))).fit(stop_after=5)
        Trainer(load_config(TINY, [*overrides(shards, cut), "resume=auto"])).fit()
    finally:
        torch.set_num_threads(threads)
    volatile = set(TIMING_METRICS)
    assert ([{k: v for k, v in r.items() if k not in volatile} for r in metrics(cut)]
            == [{k: v for k, v in r.items() if k not in volatile} for r in rows])


def test_two_process_cpu_run_stays_in_sync(shards, tmp_path):
    out = tmp_path / "ddp"
    done = run_cli("fit", str(TINY), *overrides(shards, out, **{"train.max_steps": 3,
                                                              "train.checkpoint_every": 3,
                                                              "data.batch_size": 4}), nproc=2)
    assert "2 process(es)" in done.stdout
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    ckpt = list_checkpoints(out)[-1]
    r0, r1 = checkpoint.load_rank(ckpt, 0), checkpoint.load_rank(ckpt, 1)
    assert r0["fingerprint"] == r1["fingerprint"]  # identical student and teacher on both ranks
    assert r0["data"] != r1["data"]  # ... fed different data
    assert not torch.equal(r0["augment_rng"], r1["augment_rng"])
    model = checkpoint.load(ckpt)
    assert model["world_size"] == 2

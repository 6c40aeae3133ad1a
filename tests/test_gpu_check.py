"""The prepared GPU check (bench/gpu_check.sh): its CPU dry run passes on an emulation of the GPU
machine's bare image (bench/bare_image.py), a missing package is one line before any check
starts, and its table judges the targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from shardkit import make_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def bare_image(where: Path, *block: str) -> dict[str, str]:
    """The environment of a process that sees only what the GPU image holds (+ ``block``)."""
    extra = [arg for name in block for arg in ("--block", name)]
    subprocess.run([sys.executable, "bench/bare_image.py", str(where), *extra], cwd=ROOT,
                   check=True, capture_output=True)
    return {**ENV, "PYTHONPATH": str(where)}


def test_the_bare_image_lacks_what_the_gpu_machine_lacks(tmp_path):
    env = bare_image(tmp_path / "bare")
    probe = ("import importlib.util as u; print(*[u.find_spec(m) is not None for m in "
             "('openslide', 'openslide_bin', 'imagecodecs', 'webdataset', 'torch', 'timm', "
             "'braceexpand', 'midnight_train')])")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False"] * 4 + ["True"] * 4
    failed = subprocess.run([sys.executable, "-c", "import openslide"], env=env,
                            capture_output=True, text=True)
    assert "ModuleNotFoundError: No module named 'openslide'" in failed.stderr


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cmu_slide):
    out = tmp_path_factory.mktemp("gpu-check-shards")
    make_shards(out, cmu_slide, n_shards=4, per_shard=24, tile_size=112)
    return out


def test_the_dry_run_passes_every_check_on_the_bare_image(tmp_path, shards):
    """What the GPU machine will run, on the CPU with tiny models, without OpenSlide,
    imagecodecs or any other package that image lacks."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--data", str(shards),
                           "--out", str(out)], cwd=ROOT, env=bare_image(tmp_path / "bare"),
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "preflight: imports and configs ok" in done.stdout
    results = json.loads((out / "gpu_check.json").read_text())
    assert set(results["checks"]) == {"vitb", "vitg", "augment", "pipeline", "preempt"}
    assert not [name for name, r in results["checks"].items() if "error" in r]
    assert "FAILED" not in (out / "gpu_check.md").read_text()


def test_a_missing_package_is_one_line_before_any_check(tmp_path, shards):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu", "--data", str(shards),
                           "--out", str(out)], cwd=ROOT,
                          env=bare_image(tmp_path / "bare", "braceexpand"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("gpu_check preflight: cannot import braceexpand: "
                               "ModuleNotFoundError: No module named 'braceexpand'. "), lines[0]
    assert "bench/gpu_check_wheels.txt" in lines[0]
    assert "== vitb" not in done.stdout and not out.exists()


def test_gpu_check_script_parses_and_its_table_judges_the_targets():
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], check=True)
    row = {"arch": "vit_giant_patch14_dinov2", "batch": 12, "crops": "2x224 + 8x98",
           "precision": "bf16", "checkpointing": True, "fsdp": True, "prototypes": 131072,
           "finite": True, "steps": 150, "step_s": 0.18, "images_per_s": 66.7,
           "tflop_per_step": 86.0, "mfu": 0.48, "peak_mem_gib": 83.5}
    results = {"device": "NVIDIA H200", "torch": "2.11.0", "when": "2026-12-01", "seconds": 400,
               "checks": {"vitg": row,
                          "augment": {"batch12": {"crops": 120, "ms_per_batch": 12.0,
                                                  "crops_per_s": 10000.0}},
                          "pipeline": {"error": "RuntimeError: exit 1: no shards"}}}
    table = gpu_check.markdown(results)
    assert ("| ViT-g/14 train step, FSDP (1 process), bf16, activation checkpointing, batch 12, "
            "crops 2x224 + 8x98, 131 072 prototypes | 0.180 | 66.7 | 48.0% | 83.5 | yes |") in table
    assert "MFU >= 40 % met, >= 60 images/s met, < 80 GB NOT met" in table
    assert "6.2% of a ViT-g step with it (target < 5 %: NOT met)" in table  # 12 / (180 + 12) ms
    assert "| full pipeline | - | - | - | - | - | FAILED: RuntimeError: exit 1: no shards |" in table

"""A plan run as 3 concurrent tasks (`run --task I --num-tasks 3`, as SLURM array tasks would)
gives exactly the shards of one local build: same names, same bytes, same sample keys."""

from __future__ import annotations

import subprocess
import sys

from shardkit import shard_contents

CLI = [sys.executable, "-m", "midnight_prep.cli"]
PLAN_ARGS = ["--tiles-per-slide", 24, "--shard-size", 10, "--slides-per-job", 1, "--seed", 5]


def test_three_tasks_give_the_local_build(slide_dir, cmu_slide, tmp_path):
    slides = [slide_dir / n for n in ("generic40x.tiff", "aperio40x.svs", "scan20x.tiff")] + [cmu_slide]
    local, split = tmp_path / "local", tmp_path / "split"
    done = subprocess.run([*CLI, "build", *map(str, slides), "-o", str(local), *map(str, PLAN_ARGS)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    subprocess.run([*CLI, "plan", *map(str, slides), "-o", str(split), *map(str, PLAN_ARGS)],
                   check=True, capture_output=True)
    tasks = [subprocess.Popen([*CLI, "run", str(split / "plan.json"), "--task", str(i), "--num-tasks", "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    ran = []
    for proc in tasks:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout + stderr
        ran.append(int(stderr.split("running ")[1].split()[0]))
    assert ran == [2, 1, 1]  # 4 jobs: task 0 runs jobs 0 and 3, tasks 1 and 2 one each
    expected = shard_contents(local)
    assert len({name.split("-")[1] for name in expected}) == 4 and all(k for _, k in expected.values())
    assert shard_contents(split) == expected
    assert not list(split.rglob("*.lock")) and not list(split.rglob("*.partial"))

"""`--executor ray` on a real local Ray instance (2 CPUs, started once for this module): the
same shards as the local executor, a killed worker's job retried to the same bytes, Ctrl-C
cancels and a Ray resume finishes the output exactly, a job that fails for good ends failed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
from shardkit import shard_contents

from midnight_prep.job import OWNER_FILE, SCRATCH_PREFIX
from midnight_prep.plan import BuildParams, make_plan
from midnight_prep.ray_executor import RayExecutor

CLI = [sys.executable, "-m", "midnight_prep.cli"]
# 3 jobs of a few seconds each (two 40x slides with ~700 tiles each, and a faster 20x one), so
# that a test can act while a job runs.
PLAN_ARGS = ["--mpp", "0.5,0.25", "--tiles-per-slide", 1400, "--shard-size", 200,
             "--slides-per-job", 1, "--seed", 3]
SLIDES = ["generic40x.tiff", "aperio40x.svs", "scan20x.tiff"]


def prep(*args, check=None) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check is not None:
        assert done.returncode == check, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray instance for this module; the CLI joins it with --ray-address (ray.init set
    RAY_AUTH_MODE=token in this process's environment, which the CLI processes inherit, as a
    user joining a token-authenticated cluster by address must set it)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             logging_level=logging.WARNING)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def slides(slide_dir):
    return [slide_dir / n for n in SLIDES]


@pytest.fixture(scope="module")
def local_build(slides, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    prep("build", *slides, "-o", out, *PLAN_ARGS, "--workers", 2, check=0)
    found = shard_contents(out)
    assert len({name.split("-")[1] for name in found}) == 3  # every job wrote shards
    return found


def ray_run(plan_or_slides, out, address, *extra, command="build", **kw):
    args = [*plan_or_slides, "-o", out, *PLAN_ARGS] if command == "build" else [plan_or_slides]
    return [*CLI, command, *map(str, args), "--executor", "ray", "--ray-address", address,
            *map(str, extra)]


def test_ray_build_gives_the_local_shards(ray_address, slides, local_build, tmp_path):
    out = tmp_path / "ray"
    done = subprocess.run(ray_run(slides, out, ray_address), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "on the Ray cluster at" in done.stderr and "tiles in" in done.stdout  # same summary
    assert shard_contents(out) == local_build
    assert not list(out.rglob("*.lock")) and not list(out.rglob("*.partial"))


def _wait_for(predicate, timeout: float = 60.0, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(every)
    raise AssertionError("timed out waiting")


def _lock_holder(out: Path, job_id: str) -> dict | None:
    try:
        return json.loads((out / "locks" / f"{job_id}.lock").read_text())
    except (FileNotFoundError, ValueError):
        return None


def test_a_killed_worker_is_retried_to_the_same_bytes(ray_address, slides, local_build, tmp_path):
    """In this process (the module's Ray driver): kill the worker running a job; Ray's retry
    builds it again, with the local bytes, and the progress counts end as if it ran once."""
    out = tmp_path / "killed"
    plan = make_plan([str(s) for s in slides], str(out), BuildParams(mpps=(0.5, 0.25), seed=3, shard_size=200),
                     tiles_per_slide=1400, slides_per_job=1)
    job = plan.jobs[0]
    counts: dict[str, int] = {}

    def progress(kind: str, n: int) -> None:
        counts[kind] = counts.get(kind, 0) + n

    results = {}
    executor = RayExecutor()  # joins the module's instance
    runner = threading.Thread(target=lambda: results.update(
        executor([job], plan.params, plan.output, plan.sha256(), progress=progress)))
    runner.start()
    try:
        holder = _wait_for(lambda: _lock_holder(out, job.job_id))
        # The lock names the Ray worker running the job (this host, its pid): kill it mid-job.
        assert holder["pid"] != os.getpid()
        _wait_for(lambda: counts.get("tiles", 0) > 0)  # it reported progress before dying
        assert not (out / "manifests" / f"{job.job_id}.json").exists()
        os.kill(holder["pid"], signal.SIGKILL)
        killed_at = time.time()
    finally:
        runner.join(timeout=120)
    outcome = results[job.job_id]
    assert outcome.error is None and outcome.ran, outcome
    manifest = json.loads((out / "manifests" / f"{job.job_id}.json").read_text())
    assert manifest["started_at"] > killed_at  # built again by the retry, after the kill
    assert outcome.manifest == manifest
    assert shard_contents(out) == {k: v for k, v in local_build.items() if k.startswith(f"{job.job_id}-")}
    assert not list(out.rglob("*.lock")) and not list(out.rglob("*.partial"))
    # The first try's counts were taken back: the bars end at the job's real totals.
    asked = sum(sum(s.quotas.values()) for s in job.slides)
    assert counts == {"slides": len(job.slides), "tiles": manifest["samples"],
                      "unfilled": asked - manifest["samples"]}
    # The retry on this node removed the dead worker's scratch files.
    for d in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        owner = d / OWNER_FILE
        if owner.is_file():
            assert json.loads(owner.read_text()).get("pid") != holder["pid"], d


def test_ctrl_c_cancels_then_a_ray_resume_finishes_exactly(ray_address, slides, local_build, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(ray_run(slides, out, ray_address), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: list((out / "manifests").glob("job-*.json")) if (out / "manifests").exists()
                  else None)
        running = _wait_for(lambda: list((out / "locks").glob("*.lock")), timeout=30)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and time.monotonic() - t0 < 30, stdout + stderr
    assert "Traceback" not in stderr, stderr
    # Cancelled cleanly: every running task let go of its lock; nothing half-published.
    assert running and not list((out / "locks").glob("*.lock"))
    assert not list(out.rglob("*.partial"))
    finished = len(list((out / "manifests").glob("job-*.json")))
    assert 1 <= finished < 3
    done = subprocess.run(ray_run(out / "plan.json", out, ray_address, command="run"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{finished} of 3 jobs already done" in done.stderr
    assert shard_contents(out) == local_build


def test_a_job_that_fails_for_good_ends_failed(ray_address, slides, tmp_path):
    out = tmp_path / "blocked"
    prep("plan", *slides, "-o", out, *PLAN_ARGS, check=0)
    (out / "shards").write_text("a file where the shards folder should be")
    t0 = time.monotonic()
    done = subprocess.run(ray_run(out, out, ray_address, "--jobs", "job-000002", command="run"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"job job-000002 did not finish \(\w+Error: ", done.stderr), done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - t0 < 60
    assert not list(out.rglob("*.lock"))


def test_without_ray_a_one_line_hint_and_no_ray_import(slide_dir, tmp_path):
    hide = "import sys; sys.modules['ray'] = None; from midnight_prep.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", hide, "build", str(slide_dir / "glass.tiff"), "-o",
                           str(tmp_path / "o"), "--executor", "ray"], capture_output=True, text=True)
    assert done.returncode == 1 and "pip install 'midnight[ray]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    check = ("import sys, midnight_prep.cli, midnight_prep.executors, midnight_prep.ray_executor; "
             "assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", check], check=True)


def test_an_unreachable_cluster_is_one_line_in_seconds(slide_dir, tmp_path):
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    # Ray alone waits for minutes there, printing only its warnings (the timeout fails this).
    done = subprocess.run([*CLI, "build", slide_dir / "glass.tiff", "-o", tmp_path / "o",
                           "--executor", "ray", "--ray-address", address],
                          capture_output=True, text=True, timeout=40)
    assert done.returncode == 1 and time.monotonic() - start < 30
    assert f"cannot join the Ray cluster at {address}: nothing answers there" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "o").exists()


def test_ray_to_object_storage_with_storage_options(ray_address, slide_dir, s3_env, tmp_path):
    """Ray workers have no AWS variables here (the instance started before they were set):
    --storage-options reach them in memory, and the shards are those of a local-disk build."""
    from object_store import ACCESS_KEY, BUCKET, SECRET_KEY

    small = [slide_dir / "generic40x.tiff", slide_dir / "scan20x.tiff"]
    args = ["--tiles-per-slide", 24, "--shard-size", 10, "--slides-per-job", 1]
    prep("build", *small, "-o", tmp_path / "local", *args, check=0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_DEFAULT_REGION="us-east-1")
    options = json.dumps({"key": ACCESS_KEY, "secret": SECRET_KEY,
                          "client_kwargs": {"endpoint_url": s3_env.endpoint}})
    out = f"s3://{BUCKET}/ray-out"
    done = subprocess.run([*CLI, "build", *map(str, small), "-o", out, *map(str, args), "--executor", "ray",
                           "--ray-address", ray_address, "--storage-options", options],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    stored = {p.rsplit("/", 1)[-1]: hashlib.sha256(fs.cat_file(p)).hexdigest()
              for p in fs.find(f"{BUCKET}/ray-out/shards")}
    assert stored == {k: v for k, (v, _) in shard_contents(tmp_path / "local").items()}

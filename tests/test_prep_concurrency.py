"""Builders working on one output at once: unique temporary names, plan.json created once, and
a lock per job (a live holder is waited for, a dead one's lock taken over)."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

CLI = [sys.executable, "-m", "midnight_prep.cli"]
FAST = ["--tiles-per-slide", "4", "--mpp", "1", "--slides-per-job", "1"]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def digests(out) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def write_lock(out, job_id: str, host: str, pid: int) -> None:
    path = out / "locks" / f"{job_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"job_id": job_id, "host": host, "pid": pid, "token": "t",
                                "since": time.time()}))


def test_exclusive_create(tmp_path):
    from midnight_prep.shards import create_new

    url = str(tmp_path / "x" / "plan.json")
    create_new(b"first", url)
    with pytest.raises(FileExistsError):
        create_new(b"second", url)
    assert (tmp_path / "x" / "plan.json").read_bytes() == b"first"
    assert os.listdir(tmp_path / "x") == ["plan.json"]  # no temporary file left


def test_two_builders_share_the_jobs(slide_dir, tmp_path):
    slides = [slide_dir / n for n in ("generic40x.tiff", "aperio40x.svs", "scan20x.tiff", "glass.tiff")]
    solo = tmp_path / "solo"
    assert finish(start("build", *slides, "-o", solo, *FAST))[0] == 0
    out = tmp_path / "out"
    a, b = start("build", *slides, "-o", out, *FAST), start("build", *slides, "-o", out, *FAST)
    (code_a, text_a), (code_b, text_b) = finish(a), finish(b)
    assert code_a == code_b == 0, text_a + text_b
    ran = [int(re.search(r"from (\d+) jobs", t).group(1)) for t in (text_a, text_b)]
    assert sum(ran) == 4, text_a + text_b  # every job built once, not twice
    assert digests(out) == digests(solo)
    assert not list(out.rglob("*.partial")) and not list((out / "locks").iterdir())


def test_two_seeds_at_once_never_mix(slide_dir, tmp_path):
    out = tmp_path / "out"
    procs = [start("build", slide_dir / "scan20x.tiff", "-o", out, *FAST, "--seed", seed) for seed in (1, 2)]
    results = [finish(p) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(text for code, text in results if code == 2)
    assert "different plan" in refused
    seed = json.loads((out / "plan.json").read_text())["params"]["seed"]
    manifest = json.loads((out / "manifests" / "job-000000.json").read_text())
    assert manifest["shards"]  # and the samples carry the plan's seed:
    tar = (out / manifest["shards"][0]["name"]).read_bytes()
    assert f'"seed": {seed}'.encode() in tar and f'"seed": {3 - seed}'.encode() not in tar


def test_a_live_holder_is_waited_for(slide_dir, tmp_path):
    """Another machine is building job-000000: the builder does the other job, says it waits,
    and takes the other machine's result once it is there, without building it again."""
    slides = [slide_dir / "generic40x.tiff", slide_dir / "scan20x.tiff"]
    elsewhere = tmp_path / "elsewhere"
    assert finish(start("build", *slides, "-o", elsewhere, *FAST))[0] == 0
    out = tmp_path / "out"
    write_lock(out, "job-000000", "node-b", 12345)
    proc = start("build", *slides, "-o", out, *FAST)
    deadline = time.time() + 60
    while not (out / "manifests" / "job-000001.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    time.sleep(1)
    assert proc.poll() is None  # still waiting for job-000000
    assert not (out / "manifests" / "job-000000.json").exists()
    # node-b finishes: its shards, then its manifest, then it releases the lock.
    for name in ("shards/job-000000-0000.tar", "manifests/job-000000.json"):
        shutil.copy(elsewhere / name, out / name)
    (out / "locks" / "job-000000.lock").unlink()
    code, text = finish(proc)
    assert code == 0, text
    assert "job-000000 is being built by node-b:12345" in text and "waiting for it" in text
    assert "job-000000 was finished by another builder" in text
    assert re.search(r"from 1 jobs", text)
    assert digests(out) == digests(elsewhere)


def test_stale_locks_and_partials_are_taken_over(slide_dir, tmp_path):
    from midnight_prep import locks

    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    write_lock(out, "job-000000", locks.HOST, int(dead))  # a builder on this machine that was killed
    write_lock(out, "job-000001", "node-b", 1)  # another machine, silent for an hour
    old = time.time() - 3600
    os.utime(out / "locks" / "job-000001.lock", (old, old))
    (out / "shards").mkdir()
    leftover = out / "shards" / ".job-000000-0000.tar.k3j4h5.partial"  # a killed upload
    leftover.write_bytes(b"half a shard")
    status = subprocess.run([*CLI, "plan", slide_dir / "generic40x.tiff", slide_dir / "scan20x.tiff",
                             "-o", out, *FAST], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    shown = subprocess.run([*CLI, "status", out], capture_output=True, text=True).stdout
    assert "job-000000: stale lock" in shown and "job-000001: stale lock" in shown
    started = time.time()
    code, text = finish(start("run", out))
    assert code == 0, text
    assert "waiting" not in text and time.time() - started < 30
    assert len(list((out / "manifests").glob("*.json"))) == 2
    assert not leftover.exists() and not list((out / "locks").iterdir())

"""Scratch space is not leaked: SIGTERM cleans up on the way out (scratch, locks), and what a
SIGKILL left behind on this machine is removed by the next run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

HOST = socket.gethostname()  # as midnight_prep.locks.HOST

CLI = [sys.executable, "-m", "midnight_prep.cli"]


def cli(*args) -> list[str]:
    return [*CLI, *map(str, args)]


def fake_scratch(tmpdir, name, pid):
    path = tmpdir / name
    path.mkdir(parents=True)
    (path / "owner.json").write_text(json.dumps({"host": HOST, "pid": pid}))
    (path / "tiles.bin").write_bytes(b"\0" * 1000)
    return path


def test_scratch_of_killed_runs_is_removed(slide_dir, tmp_path):
    tmpdir = tmp_path / "tmp"
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)
    killed = fake_scratch(tmpdir, "midnight-prep-job-000003-k1ll3d", dead)
    running = fake_scratch(tmpdir, "midnight-prep-job-000004-l1v3", os.getpid())  # someone else's, alive
    done = subprocess.run(cli("build", slide_dir / "scan20x.tiff", "-o", tmp_path / "out",
                              "--tiles-per-slide", 4, "--mpp", 1), capture_output=True, text=True,
                          env={**os.environ, "TMPDIR": str(tmpdir)})
    assert done.returncode == 0, done.stderr
    assert not killed.exists() and running.exists()
    assert sorted(p.name for p in tmpdir.iterdir()) == [running.name]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_cleans_up(slide_dir, cmu_slide, tmp_path, workers):
    tmpdir, out = tmp_path / "tmp", tmp_path / "out"
    tmpdir.mkdir()
    proc = subprocess.Popen(cli("build", cmu_slide, slide_dir / "generic40x.tiff", "-o", out,
                                "--tiles-per-slide", 2000, "--slides-per-job", 1, "--workers", workers),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmpdir)})
    deadline = time.time() + 60
    while not any((p / "tiles.bin").exists() for p in tmpdir.glob("midnight-*")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not list(tmpdir.glob("midnight-*")), err
    assert not list((out / "locks").glob("*.lock")) and not list(out.rglob("*.partial"))
    assert not list((out / "manifests").glob("*.json")) if (out / "manifests").exists() else True
    assert "Traceback" not in err


def test_a_failed_publish_leaves_no_partial_file(tmp_path):
    from midnight_prep.shards import publish

    src = tmp_path / "shard.tar"
    src.write_bytes(b"x" * 1000)
    target = tmp_path / "out" / "shards" / "job-000000-0000.tar"
    target.mkdir(parents=True)  # a directory in the way: the final rename fails
    with pytest.raises(OSError):
        publish(str(src), str(target))
    assert [p.name for p in target.parent.iterdir()] == [target.name]

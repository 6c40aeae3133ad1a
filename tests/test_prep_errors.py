"""Errors are one clear line; --debug shows the traceback."""

import json
import subprocess
import sys

CLI = [sys.executable, "-m", "midnight_prep.cli"]


def prep(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True)


def test_unreadable_shards_are_named_in_one_line(slide_dir, tmp_path):
    out = tmp_path / "out"
    assert prep("build", slide_dir / "scan20x.tiff", "-o", out, "--tiles-per-slide", 4, "--mpp", 1).returncode == 0
    good = out / "shards" / "job-000000-0000.tar"
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(good.read_bytes()[:5000])
    notatar = tmp_path / "notatar.tar"
    notatar.write_text("hello" * 200)
    done = prep("inspect", good, truncated, notatar, tmp_path / "missing.tar", "--out", tmp_path / "s.png")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"{good}: 4 samples" in done.stdout and (tmp_path / "s.png").exists()
    for bad in (truncated, notatar):
        assert f"{bad}: is not a readable shard (truncated, or not a tar file)" in done.stderr
    assert f"{tmp_path / 'missing.tar'}: cannot be opened" in done.stderr
    debug = prep("inspect", notatar, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_malformed_manifest_is_one_line_and_redone(slide_dir, tmp_path):
    out = tmp_path / "out"
    args = ["build", slide_dir / "scan20x.tiff", "-o", out, "--tiles-per-slide", 4, "--mpp", 1]
    assert prep(*args).returncode == 0
    path = out / "manifests" / "job-000000.json"
    manifest = json.loads(path.read_text())
    del manifest["slides"][0]["rejected"]  # valid JSON, wrong shape
    path.write_text(json.dumps(manifest))
    status = prep("status", out)
    assert status.returncode == 1 and "Traceback" not in status.stdout + status.stderr
    assert "job-000000: its manifest cannot be read" in status.stdout
    again = prep(*args)
    assert again.returncode == 0 and "job-000000 is damaged" in again.stderr

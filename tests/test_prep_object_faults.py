"""The builder against a real S3 server (SeaweedFS on loopback) that fails: down at the start,
wrong credentials, no bucket, killed in the middle of an upload (then back, or restarted before
a rerun), a shard deleted behind its back; and secrets given as storage options never stored."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time

import fsspec
from click.testing import CliRunner
from object_store import ACCESS_KEY, BUCKET, SECRET_KEY

from midnight_prep import shards
from midnight_prep.cli import main

CLI = [sys.executable, "-m", "midnight_prep.cli"]
# One slide per job, one sample per shard: a job uploads many small shards, so the server can
# be killed while a job is in the middle of its uploads.
OPTIONS = ["--tiles-per-slide", "60", "--mpp", "1,0.5", "--slides-per-job", "1", "--shard-size", "1"]
LONG_UPLOADS = [*OPTIONS, "--tiles-per-slide", "120"]  # the last one counts


def prep(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_digests(url: str) -> dict[str, str]:
    """shards/NAME -> sha256 of every shard under the output ``url`` (local or s3://)."""
    fs, base = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    found = fs.glob(f"{base}/shards/*")
    return {f"shards/{p.rsplit('/', 1)[-1]}": hashlib.sha256(fs.cat_file(p)).hexdigest() for p in found}


def wait_for(predicate, timeout: float = 60.0, every: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def fault_env(retry_s: float) -> dict[str, str]:
    # One HTTP try per call (AWS_MAX_ATTEMPTS is botocore's own setting): our retry loop is then
    # the only one, and its budget alone says how long a write keeps trying.
    return {**os.environ, "MIDNIGHT_STORAGE_RETRY_S": str(retry_s), "AWS_MAX_ATTEMPTS": "1"}


def test_unusable_storage_is_one_paragraph_in_seconds(slide_dir, s3_env, monkeypatch):
    slide = slide_dir / "scan20x.tiff"
    assert prep("plan", slide, "-o", "s3://midnight/faults-start", *OPTIONS).exit_code == 0

    # Server down (nothing listens on the endpoint): a real process, to see its stderr and timing.
    down = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}"}
    started = time.monotonic()
    proc = subprocess.run([*CLI, "build", slide, "-o", "s3://midnight/faults-down", *OPTIONS],
                          capture_output=True, text=True, env=down, timeout=60)
    assert time.monotonic() - started < 10
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
    assert down["AWS_ENDPOINT_URL"] in proc.stderr and "storage server is up" in proc.stderr, proc.stderr
    monkeypatch.setenv("AWS_ENDPOINT_URL", down["AWS_ENDPOINT_URL"])
    for args in (["plan", slide, "-o", "s3://midnight/faults-down", *OPTIONS],
                 ["run", "s3://midnight/faults-start/plan.json"], ["status", "s3://midnight/faults-start"]):
        result = prep(*args)
        assert result.exit_code == 1 and "storage server is up" in result.output, (args, result.output)
        assert "Traceback" not in result.output and down["AWS_ENDPOINT_URL"] in result.output
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for args in (["build", slide, "-o", "s3://midnight/faults-start", *OPTIONS],
                 ["status", "s3://midnight/faults-start"]):
        result = prep(*args)
        assert result.exit_code == 1 and "check the credentials" in result.output, result.output
        assert s3_env.endpoint in result.output and "not-the-secret" not in result.output
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)

    for args in (["plan", slide, "-o", "s3://no-such-bucket/x", *OPTIONS],
                 ["run", "s3://no-such-bucket/x/plan.json"]):
        result = prep(*args)
        assert result.exit_code == 1 and "there is no bucket 'no-such-bucket'" in result.output, result.output


def test_endpoint_and_credentials_from_an_aws_profile(slide_dir, s3_env, monkeypatch, tmp_path):
    """No AWS variable but AWS_PROFILE: botocore reads the endpoint and keys from the files."""
    (tmp_path / "config").write_text(f"[profile lab]\nregion = us-east-1\nendpoint_url = {s3_env.endpoint}\n")
    (tmp_path / "credentials").write_text(
        f"[lab]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    fsspec.filesystem("s3").clear_instance_cache()
    made = prep("plan", slide_dir / "scan20x.tiff", "-o", "s3://midnight/faults-profile", *OPTIONS)
    assert made.exit_code == 0, made.output
    assert shards.exists("s3://midnight/faults-profile/plan.json")
    missing = prep("status", "s3://no-such-bucket/x")
    assert missing.exit_code == 1 and f"endpoint {s3_env.endpoint}" in missing.output, missing.output


def test_server_killed_mid_upload_then_rerun_gives_a_clean_build(slide_dir, s3_env, tmp_path):
    slides = [slide_dir / "generic40x.tiff", slide_dir / "aperio40x.svs"]
    clean = prep("build", *slides, "-o", tmp_path / "clean", *LONG_UPLOADS)
    assert clean.exit_code == 0, clean.output
    expected = shard_digests(str(tmp_path / "clean"))
    assert len(expected) > 20

    out = "s3://midnight/faults-killed"
    fs = fsspec.filesystem("s3")
    build = subprocess.Popen([*CLI, "build", *slides, "-o", out, *LONG_UPLOADS], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=fault_env(retry_s=2))
    try:
        # The second job has started (sampling, or already uploading its shards): the server dies.
        wait_for(lambda: fs.exists(f"{out}/locks/job-000001.lock")
                 or fs.exists(f"{out}/shards/job-000001-0000.tar") or build.poll() is not None)
        s3_env.kill()
        stdout, stderr = build.communicate(timeout=60)
    finally:
        if s3_env.proc is None:
            s3_env.start()
    assert build.returncode == 1, stdout + stderr
    assert "did not finish" in stderr and "Traceback" not in stderr and s3_env.endpoint in stderr

    rerun = subprocess.run([*CLI, "run", f"{out}/plan.json"], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "1 of 2 jobs already done" in rerun.stderr
    assert shard_digests(out) == expected
    fs.invalidate_cache()
    assert not fs.glob(f"{out}/locks/*")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{out}/manifests", detail=False)) == \
        ["job-000000.json", "job-000001.json"]


def test_a_brief_outage_mid_upload_is_retried(s3_env, monkeypatch, tmp_path, caplog):
    """The server dies during an upload and is back within the retry budget: the upload ends
    complete, and nothing else was needed."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("MIDNIGHT_STORAGE_RETRY_S", "60")
    data = os.urandom(3 << 20)
    (tmp_path / "shard.tar").write_bytes(data)
    url = "s3://midnight/faults-brief/shards/job-000000-0000.tar"
    s3_env.kill()
    restarted = threading.Timer(1.5, s3_env.start)
    restarted.start()
    started = time.monotonic()
    try:
        shards.publish(str(tmp_path / "shard.tar"), url)
    finally:
        restarted.join()
    assert time.monotonic() - started > 1.5
    assert any("retrying in" in r.getMessage() for r in caplog.records)
    fs = fsspec.filesystem("s3")
    assert fs.info(url)["size"] == len(data) and fs.cat_file(url) == data


def test_a_whole_build_rides_out_a_brief_outage(slide_dir, s3_env, tmp_path):
    """The server dies as the second job starts and is back within the retry budget: every
    storage call of the job start (lock, state, old manifest), its uploads and its manifest wait
    for it, and the build ends complete, as a clean one, with no rerun."""
    slides = [slide_dir / "generic40x.tiff", slide_dir / "aperio40x.svs"]
    clean = prep("build", *slides, "-o", tmp_path / "clean", *OPTIONS)
    assert clean.exit_code == 0, clean.output
    out = "s3://midnight/faults-brief-build"
    fs = fsspec.filesystem("s3")
    build = subprocess.Popen([*CLI, "build", *slides, "-o", out, *OPTIONS], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=fault_env(retry_s=60))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(build.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: fs.exists(f"{out}/locks/job-000001.lock") or build.poll() is not None)
        s3_env.kill()
        wait_for(lambda: any("retrying in" in line for line in lines) or build.poll() is not None)
    finally:
        s3_env.start()
    assert build.wait(timeout=120) == 0, "".join(lines)
    reader.join()
    assert any("retrying in" in line for line in lines)
    assert shard_digests(out) == shard_digests(str(tmp_path / "clean"))
    fs.invalidate_cache()
    assert not fs.glob(f"{out}/locks/*")


def test_a_deleted_shard_is_damage_and_is_rebuilt_identically(slide_dir, s3_env):
    out = "s3://midnight/faults-deleted"
    assert prep("build", slide_dir / "scan20x.tiff", "-o", out, *OPTIONS).exit_code == 0
    before = shard_digests(out)
    fs = fsspec.filesystem("s3")
    fs.rm_file(f"{out}/shards/job-000000-0003.tar")
    status = prep("status", out)
    assert status.exit_code == 1
    assert "job-000000: shard shards/job-000000-0003.tar is missing" in status.output, status.output
    rerun = prep("run", out)
    assert rerun.exit_code == 0 and "job-000000 is damaged" in rerun.output, rerun.output
    assert shard_digests(out) == before
    assert prep("status", out, "--verify").exit_code == 0


def test_storage_options_reach_the_workers_and_no_file_holds_the_secret(slide_dir, s3_env, tmp_path):
    out = "s3://midnight/faults-secret"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_DEFAULT_REGION="us-east-1")
    options = json.dumps({"key": ACCESS_KEY, "secret": SECRET_KEY,
                          "client_kwargs": {"endpoint_url": s3_env.endpoint}})
    slides = [slide_dir / "generic40x.tiff", slide_dir / "scan20x.tiff"]
    texts = []
    for args in (["build", *slides, "-o", out, *OPTIONS, "--workers", "2", "--storage-options", options],
                 ["status", out, "--storage-options", options],
                 ["status", out]):  # no credentials at all: refused, and said so
        proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)
        texts.append(proc.stdout + proc.stderr)
        assert proc.returncode == (1 if args == ["status", out] else 0), texts[-1]
    assert "check the credentials" in texts[-1]
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    stored = fs.find(f"{BUCKET}/faults-secret")
    assert any(p.endswith("plan.json") for p in stored) and len([p for p in stored if "/manifests/" in p]) == 2
    for path in stored:
        assert SECRET_KEY.encode() not in fs.cat_file(path), path
    for text in [*texts, "\n".join(stored)]:
        assert SECRET_KEY not in text
    assert s3_env.endpoint.encode() not in fs.cat_file(f"{BUCKET}/faults-secret/plan.json")

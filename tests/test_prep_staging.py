"""Slides on object storage (a real SeaweedFS server): a build from an s3:// prefix or a CSV on
s3 gives the local build's samples (all but the `source` field), slides are staged through a
bounded local cache shared by processes, and a missing object is a failed slide, not a crash."""

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from midnight_prep.shards import read_shard
from midnight_prep.staging import SlideCache, StagingError

CLI = [sys.executable, "-m", "midnight_prep.cli"]
GOOD = ("generic40x.tiff", "aperio40x.svs", "scan20x.tiff")
FAST = ["--tiles-per-slide", "8", "--mpp", "1,0.5", "--slides-per-job", "2", "--shard-size", "5"]
PREFIX = "midnight/staging"


def build(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "build", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def samples(out: Path) -> list[tuple[str, str, bytes, dict]]:
    """(shard, key, jpg, json) of every sample of an output, in shard order."""
    found = []
    for shard in sorted((out / "shards").glob("*.tar")):
        for key, files in read_shard(str(shard)):
            found.append((shard.name, key, files["jpg"], json.loads(files["json"])))
    return found


def entry_of(stage: Path, url: str) -> Path | None:
    """The complete entry of ``url`` in a slide cache folder, if any (names hash its version)."""
    for meta in stage.glob("*/entry.json"):
        if json.loads(meta.read_text())["url"] == url:
            return meta.parent
    return None


def entries(stage: Path) -> list[str]:
    """What a slide cache folder holds besides its global lock file."""
    return sorted(p.name for p in stage.iterdir() if p.name != "cache.lock") if stage.exists() else []


@pytest.fixture
def s3_slides(slide_dir, s3_env):
    """GOOD slides in the bucket under PREFIX/slides/ (uploaded once per server)."""
    fs = fsspec.filesystem("s3")
    for name in GOOD:
        if not fs.exists(f"{PREFIX}/slides/{name}"):
            fs.put_file(str(slide_dir / name), f"{PREFIX}/slides/{name}")
    return fs


def test_s3_prefix_builds_the_local_shards(slide_dir, s3_slides, tmp_path):
    local = tmp_path / "slides"
    local.mkdir()
    for name in GOOD:
        (local / name).symlink_to(slide_dir / name)
    stage = tmp_path / "stage"
    done_local = build(local, "-o", tmp_path / "local", *FAST)
    done_s3 = build(f"s3://{PREFIX}/slides/", "-o", tmp_path / "s3", *FAST, "--workers", 2,
                    "--stage-dir", stage)
    assert done_local.returncode == 0, done_local.stderr
    assert done_s3.returncode == 0, done_s3.stderr

    ours, theirs = samples(tmp_path / "local"), samples(tmp_path / "s3")
    assert len(ours) == 3 * 8 and len({s[0] for s in ours}) > 2  # several jobs and shards
    assert [s[:3] for s in theirs] == [s[:3] for s in ours]  # shards, keys and JPEG bytes
    for (_, _, _, a), (_, _, _, b) in zip(ours, theirs):
        name = Path(a.pop("source")).name
        assert a["slide_id"] == name.split(".")[0]
        assert b.pop("source") == f"s3://{PREFIX}/slides/{name}"
        assert a == b  # every other field
    manifest = json.loads((tmp_path / "s3" / "manifests" / "job-000000.json").read_text())
    assert [s["source"] for s in manifest["slides"]] == [f"s3://{PREFIX}/slides/{n}"
                                                         for n in ("aperio40x.svs", "generic40x.tiff")]
    assert entries(stage) == []  # every staged slide removed after its job


def test_csv_on_s3_and_a_missing_object(s3_slides, tmp_path):
    rows = ["path,slide_id", "slides/generic40x.tiff,", f"s3://{PREFIX}/slides/scan20x.tiff,scan",
            "slides/gone.svs,"]
    s3_slides.pipe_file(f"{PREFIX}/list.csv", "\n".join(rows).encode())
    stage = tmp_path / "stage"
    done = build(f"s3://{PREFIX}/list.csv", "-o", tmp_path / "out", *FAST, "--stage-dir", stage)
    assert done.returncode == 1, done.stderr  # a slide failed
    assert "Traceback" not in done.stderr
    slides = {s["slide_id"]: s for m in sorted((tmp_path / "out" / "manifests").glob("*.json"))
              for s in json.loads(m.read_text())["slides"]}
    assert sorted(slides) == ["generic40x", "gone", "scan"]
    assert slides["generic40x"]["source"] == f"s3://{PREFIX}/slides/generic40x.tiff"
    assert slides["scan"]["status"] == "ok" and sum(slides["scan"]["written"].values()) == 8
    gone = slides["gone"]
    assert gone["status"] == "failed"
    assert f"s3://{PREFIX}/slides/gone.svs" in gone["error"] and "FileNotFoundError" in gone["error"]
    assert "check the bucket and path names" in gone["error"] and "\n" not in gone["error"]
    assert entries(stage) == []


# Holds one slide of the cache for a while and records when, what it saw and where.
HOLD = """
import json, os, sys, time
from midnight_prep.staging import SlideCache
root, max_bytes, url, record, together = sys.argv[1:]
cache = SlideCache(root, int(max_bytes), keep=True)
with cache.acquire(url) as held:
    start = time.time()
    if together:  # hold until the other holder holds too (a barrier, not a guess of timing)
        open(os.path.join(together, str(os.getpid())), "w").close()
        deadline = time.time() + 60
        while len(os.listdir(together)) < 2 and time.time() < deadline:
            time.sleep(0.02)
    else:
        time.sleep(1.0)
    seen = {"url": url, "start": start, "end": time.time(), "path": held.path,
            "size": os.path.getsize(held.path), "used": cache.used_bytes()}
open(record, "w").write(json.dumps(seen))
"""


def hold_concurrently(stage: Path, max_bytes: int, urls: list[str], tmp_path: Path,
                      together: Path | None = None) -> list[dict]:
    records = [tmp_path / f"hold-{i}.json" for i in range(len(urls))]
    if together:
        together.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(stage), str(max_bytes), url, str(rec),
                               str(together or "")],
                              stderr=subprocess.PIPE, text=True) for url, rec in zip(urls, records)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    return [json.loads(rec.read_text()) for rec in records]


def test_cache_bound_and_sharing_across_processes(s3_env, tmp_path):
    fs = fsspec.filesystem("s3")
    size = 200_000
    for name in ("a.svs", "b.svs"):
        fs.pipe_file(f"{PREFIX}/blobs/{name}", os.urandom(size))
    a, b = f"s3://{PREFIX}/blobs/a.svs", f"s3://{PREFIX}/blobs/b.svs"
    stage = tmp_path / "stage"

    # Room for one slide only: the second process waits until the first has released its slide.
    first, second = sorted(hold_concurrently(stage, size * 3 // 2, [a, b], tmp_path),
                           key=lambda r: r["start"])
    assert first["end"] <= second["start"]
    assert first["size"] == second["size"] == size
    assert first["used"] == second["used"] == size  # never two slides on disk
    # kept (keep=True): the entry of the slide held second, and its lock file; either process
    # may be the first to get in
    assert len(entries(stage)) == 2 and {first["url"], second["url"]} == {a, b}
    assert entry_of(stage, second["url"]) is not None
    assert entry_of(stage, first["url"]) is None

    # Room for both: the same slide is held by both at once, from one copy.
    one, two = hold_concurrently(stage, size * 3, [a, a], tmp_path, together=tmp_path / "both")
    assert one["path"] == two["path"] and one["start"] < two["end"] and two["start"] < one["end"]
    # what is left: the slide kept from the first part, and a (the same one if a came second)
    assert SlideCache(str(stage), size * 3).clean() == len({second["url"], a}) * size
    assert entries(stage) == []


def test_staging_errors_and_leftovers(s3_env, tmp_path):
    fs = fsspec.filesystem("s3")
    fs.pipe_file(f"{PREFIX}/blobs/c.svs", b"x" * 5000)
    fs.pipe_file(f"{PREFIX}/mirax/m.mrxs", b"index")
    fs.pipe_file(f"{PREFIX}/mirax/m/Slidedat.ini", b"[GENERAL]")
    fs.pipe_file(f"{PREFIX}/mirax/m/Data0000.dat", b"d" * 300)
    stage = tmp_path / "stage"
    cache = SlideCache(str(stage), 10_000, retry_s=1, wait_s=5, keep=False)

    with cache.open_local(str(tmp_path / "local.svs")) as path:  # local: no copy
        assert path == str(tmp_path / "local.svs") and not stage.exists()

    # A killed downloader's partial folder (its entry unlocked) is removed, its room freed.
    url = f"s3://{PREFIX}/blobs/c.svs"
    (stage / "dead.partial").mkdir(parents=True)
    (stage / "dead.partial" / "entry.json").write_text(json.dumps({"url": "x", "bytes": 9000}))
    with cache.open_local(url) as path:
        assert Path(path).read_bytes() == b"x" * 5000 and Path(path).name == "c.svs"
        assert cache.used_bytes() == 5000
    assert entries(stage) == []  # keep=False: removed on release

    # An entry half removed by a process killed while evicting it (no entry.json) is fetched
    # again, not an error for ever after.
    kept = SlideCache(str(stage), 10_000, retry_s=1, wait_s=5, keep=True)
    with kept.open_local(url):
        pass
    (entry_of(stage, url) / "entry.json").unlink()
    with kept.open_local(url) as path:
        assert Path(path).read_bytes() == b"x" * 5000 and kept.used_bytes() == 5000
    assert kept.clean() == 5000

    with cache.open_local(f"s3://{PREFIX}/mirax/m.mrxs") as path:  # the data folder comes along
        assert Path(path).read_bytes() == b"index"
        assert (Path(path).parent / "m" / "Data0000.dat").read_bytes() == b"d" * 300

    with pytest.raises(StagingError, match="FileNotFoundError.*check the bucket and path names"):
        cache.acquire(f"s3://{PREFIX}/blobs/none.svs")
    with pytest.raises(StagingError, match="more than the slide cache's limit"):
        SlideCache(str(stage), 1000).acquire(url)
    with pytest.raises(StagingError, match="Hamamatsu .vms"):
        cache.acquire(f"s3://{PREFIX}/x.vms")
    assert entries(stage) == []  # failures leave nothing, not even lock files


def test_a_replaced_object_is_staged_anew_and_never_served_unchecked(slide_dir, s3_env, tmp_path,
                                                                      monkeypatch):
    fs = fsspec.filesystem("s3")
    url, blob = f"s3://{PREFIX}/replaced/slide.tiff", f"s3://{PREFIX}/replaced/blob.svs"
    stage = tmp_path / "stage"
    kept = SlideCache(str(stage), 10**8, retry_s=1, wait_s=5, keep=True)
    # A copy kept by a trainer (keep=True), then the object is replaced by another slide.
    fs.put_file(str(slide_dir / "glass.tiff"), url)
    with kept.open_local(url) as path:
        assert Path(path).read_bytes() == (slide_dir / "glass.tiff").read_bytes()
    fs.put_file(str(slide_dir / "generic40x.tiff"), url)
    with kept.open_local(url) as path:
        assert Path(path).read_bytes() == (slide_dir / "generic40x.tiff").read_bytes()
    # The same size, other bytes: the ETag tells them apart.
    fs.pipe_file(blob, b"a" * 3000)
    with kept.open_local(blob):
        pass
    fs.pipe_file(blob, b"b" * 3000)
    with kept.open_local(blob) as path:
        assert Path(path).read_bytes() == b"b" * 3000

    # A build from the same URL (the builder's cache: the default one in --stage-dir) uses the
    # slide now there: glass (no tissue, nothing written) staged first, H&E now.
    fs.put_file(str(slide_dir / "glass.tiff"), url)
    with kept.open_local(url):
        pass
    fs.put_file(str(slide_dir / "generic40x.tiff"), url)
    done = build(url, "-o", tmp_path / "out", *FAST, "--stage-dir", stage)
    assert done.returncode == 0, done.stderr
    assert len(samples(tmp_path / "out")) == 8

    # A cached copy is not served when the store refuses the credentials.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    fs.clear_instance_cache()
    with pytest.raises(StagingError, match=f"cannot read {url}"):
        kept.acquire(url)

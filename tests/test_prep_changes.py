"""A slide changed between `plan` and `run` is refused by name, not used silently: the plan
records each slide's size (and on object storage its ETag), outside the plan's hash, and plans
of the older format without them still load and run."""

import json
import shutil
import subprocess
import sys

import fsspec
import pytest

from midnight_prep.plan import Plan

CLI = [sys.executable, "-m", "midnight_prep.cli"]
FAST = ["--tiles-per-slide", "4", "--mpp", "1", "--slides-per-job", "1", "--shard-size", "5"]


def prep(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_a_local_slide_changed_after_plan_is_refused_by_name(slide_dir, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("generic40x.tiff", "scan20x.tiff"):
        shutil.copy(slide_dir / name, slides / name)
    out = tmp_path / "out"
    done = prep("plan", slides, "-o", out, *FAST)
    assert done.returncode == 0, done.stderr
    plan = json.loads((out / "plan.json").read_text())
    recorded = {s["slide_id"]: s["size"] for j in plan["jobs"] for s in j["slides"]}
    assert recorded == {"generic40x": (slides / "generic40x.tiff").stat().st_size,
                        "scan20x": (slides / "scan20x.tiff").stat().st_size}
    # The sizes say which file, not what is built: the hash is that of a plan without them.
    for job in plan["jobs"]:
        for slide in job["slides"]:
            del slide["size"], slide["etag"]
    assert Plan.from_dict(plan).sha256() == Plan.from_dict(
        json.loads((out / "plan.json").read_text())).sha256()

    shutil.copy(slide_dir / "aperio40x.svs", slides / "scan20x.tiff")  # another slide, same name
    done = prep("run", out / "plan.json")
    assert done.returncode == 1
    assert "scan20x" in done.stdout and "changed since the plan was made" in done.stdout
    manifests = [json.loads(m.read_text()) for m in sorted((out / "manifests").glob("*.json"))]
    status = {s["slide_id"]: s["status"] for m in manifests for s in m["slides"]}
    assert status == {"generic40x": "ok", "scan20x": "failed"}

    # A plan.json of the older format (no sizes) loads and runs as before.
    old = tmp_path / "old"
    old.mkdir()
    (old / "plan.json").write_text(json.dumps({**plan, "output": str(old)}))
    done = prep("run", old / "plan.json")
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_object_replaced_after_plan_is_refused_by_name(slide_dir, s3_env, tmp_path):
    fs = fsspec.filesystem("s3")
    url = "s3://midnight/changes/slides/generic40x.tiff"
    good = (slide_dir / "generic40x.tiff").read_bytes()
    fs.pipe_file(url, good)
    out = tmp_path / "out"
    done = prep("plan", url, "-o", out, *FAST)
    assert done.returncode == 0, done.stderr
    spec = json.loads((out / "plan.json").read_text())["jobs"][0]["slides"][0]
    assert spec["size"] == len(good) and spec["etag"]
    fs.pipe_file(url, good[:-1] + bytes([good[-1] ^ 1]))  # the same size, other bytes
    done = prep("run", out, "--stage-dir", tmp_path / "stage")
    assert done.returncode == 1
    assert "changed since the plan was made (ETag" in done.stdout and url in done.stdout


def test_slide_lists_merge_a_folders_slides_and_read_a_bom(slide_dir, tmp_path):
    from midnight_prep.plan import BuildParams, PlanError, make_plan

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("generic40x.tiff", "nompp.tiff"):
        (slides / name).symlink_to(slide_dir / name)
    # A spreadsheet's CSV (byte-order mark) that sets the µm/px of one slide of the folder.
    listed = tmp_path / "list.csv"
    listed.write_text("path,mpp,slide_id\nslides/nompp.tiff,0.5,small\n", encoding="utf-8-sig")
    params = BuildParams(mpps=(1.0,))
    plan = make_plan([str(slides), str(listed)], str(tmp_path / "out"), params, tiles_per_slide=4)
    found = {s.slide_id: (s.path, s.mpp) for s in plan.slides}
    assert found == {"generic40x": (str(slides / "generic40x.tiff"), None),
                     "small": (str(slides / "nompp.tiff"), 0.5)}  # once, the list's values

    twice = tmp_path / "twice.csv"
    twice.write_text("path,slide_id\nslides/nompp.tiff,a\nslides/nompp.tiff,b\n")
    with pytest.raises(PlanError, match="nompp.tiff is given twice with different slide_id"):
        make_plan([str(twice)], str(tmp_path / "out"), params, tiles_per_slide=4)

    negative = tmp_path / "negative.csv"
    negative.write_text("path,mpp\nslides/nompp.tiff,-0.5\n")
    with pytest.raises(PlanError, match=r"negative.csv:2: mpp '-0.5' is not a valid µm/px"):
        make_plan([str(negative)], str(tmp_path / "out"), params, tiles_per_slide=4)


def test_written_files_follow_the_umask(slide_dir, tmp_path):
    import os
    import stat

    from midnight_prep import shards

    old = os.umask(0o022)
    try:
        shards.create_new(b"{}", str(tmp_path / "a.json"))
        (tmp_path / "local.tar").write_bytes(b"x")
        shards.publish(str(tmp_path / "local.tar"), str(tmp_path / "out" / "b.tar"))
        done = prep("plan", slide_dir / "generic40x.tiff", "-o", tmp_path / "plan", *FAST)
        assert done.returncode == 0, done.stderr
    finally:
        os.umask(old)
    for path in (tmp_path / "a.json", tmp_path / "out" / "b.tar", tmp_path / "plan" / "plan.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path  # readable by colleagues


def test_status_into_a_closed_pipe_exits_quietly(slide_dir, tmp_path):
    import os

    out = tmp_path / "out"
    done = prep("build", slide_dir / "generic40x.tiff", "-o", out, *FAST)
    assert done.returncode == 0, done.stderr
    read, write = os.pipe()
    os.close(read)  # as `| head` does once it has its lines
    try:
        done = subprocess.run([*CLI, "status", str(out), "--verify"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert done.returncode != 0 and done.stderr == ""


def test_a_rerun_of_a_finished_build_says_what_is_there(slide_dir, tmp_path):
    args = ["build", slide_dir / "generic40x.tiff", slide_dir / "scan20x.tiff", "-o",
            tmp_path / "out", *FAST]
    assert prep(*args).returncode == 0
    again = prep(*args)
    assert again.returncode == 0, again.stderr
    assert "2 of 2 jobs already done (8 tiles in 2 shards from 2 jobs)" in again.stdout
    assert "0 tiles in 0 shards" not in again.stdout


def test_estimate_applies_the_per_slide_cap_and_skipped_magnifications(slide_dir, tmp_path):
    done = prep("plan", slide_dir / "generic40x.tiff", slide_dir / "scan20x.tiff", "-o",
                tmp_path / "out", "--mpp", "0.25", "--tiles-per-slide", 1_000_000, "--estimate",
                "--json")
    assert done.returncode == 0, done.stderr
    e = json.loads(done.stdout)["estimate"]
    # scan20x (0.5 µm/px) cannot give 0.25 (the dry run's "will be skipped"); generic40x
    # (3072 x 2560 px at 0.25) at most 16 x its area / the tile's.
    assert e["tiles_asked"] == 2_000_000
    assert e["tiles"] == e["tiles_per_mpp"]["0.25"] == 16 * 3072 * 2560 // 256 ** 2
    text = prep("plan", slide_dir / "generic40x.tiff", slide_dir / "scan20x.tiff", "-o",
                tmp_path / "out", "--mpp", "0.25", "--tiles-per-slide", 1_000_000, "--estimate")
    assert "at most 1,920 (0.25: 1,920) of 2,000,000 asked" in text.stdout


def test_a_local_list_of_s3_slides_with_the_store_down(slide_dir, s3_env, tmp_path):
    import os
    import threading
    import time

    from midnight_prep.plan import BuildParams, JobSpec, Plan, SlideSpec

    url = "s3://midnight/changes/down/generic40x.tiff"
    fsspec.filesystem("s3").put_file(str(slide_dir / "generic40x.tiff"), url)
    listed = tmp_path / "list.csv"
    listed.write_text(f"path\n{url}\n")
    later = tmp_path / "later"  # a plan made while the store was up
    later.mkdir()
    plan = Plan(str(later), BuildParams(mpps=(1.0,)),
                [JobSpec("job-000000", [SlideSpec(url, "g", quotas={"1": 4})])])
    (later / "plan.json").write_text(plan.to_json())
    s3_env.kill()
    try:
        start = time.monotonic()  # build: the first look at the slides' store, in seconds
        done = prep("build", listed, "-o", tmp_path / "out", *FAST)
        assert done.returncode != 0 and time.monotonic() - start < 60
        assert "cannot use s3://midnight/changes/down" in done.stderr
        assert "storage server is up" in done.stderr and "Traceback" not in done.stderr
        # `run` of the earlier plan: staging says at once what it is waiting for.
        proc = subprocess.Popen([*CLI, "run", str(later)], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True,
                                env={**os.environ, "MIDNIGHT_STAGE_DIR": str(tmp_path / "stage")})
        said: list[str] = []
        threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True).start()
        try:
            deadline = time.monotonic() + 30
            while "retrying for up to" not in "".join(said) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert f"cannot read {url}" in "".join(said) and "retrying for up to" in "".join(said)
        finally:
            proc.kill()
            proc.wait()
        assert f"remote slides are staged (copied for OpenSlide) in {tmp_path / 'stage'}" in "".join(said)
    finally:
        s3_env.start()

"""End to end: the `midnight-prep` CLI on real slide files, as a user runs it."""

import hashlib
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from midnight_prep.shards import META_FIELDS

CLI = [sys.executable, "-m", "midnight_prep.cli"]
GOOD = ["generic40x.tiff", "aperio40x.svs", "scan20x.tiff", "glass.tiff"]


def prep(*args, check=None, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, **kw)
    if check is not None:
        assert done.returncode == check, done.stdout + done.stderr
    return done


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def read_samples(out: Path) -> list[tuple[str, dict, bytes]]:
    import webdataset as wds

    urls = [str(p) for p in sorted((out / "shards").glob("*.tar"))]
    return [(s["__key__"], json.loads(s["json"]), s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)]


@pytest.fixture(scope="module")
def full_build(slide_dir, cmu_slide, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "out"
    done = prep("build", slide_dir, cmu_slide, "-o", out, "--tiles-per-slide", 48, "--shard-size", 40,
                "--slides-per-job", 3, "--workers", 2)
    return out, done


def test_build_writes_the_shard_contract(full_build, slide_dir):
    out, done = full_build
    samples = read_samples(out)
    assert len(samples) > 100
    keys = [k for k, _, _ in samples]
    assert len(set(keys)) == len(keys)
    distinct = {(m["slide_id"], m["mpp"], m["x"], m["y"]) for _, m, _ in samples}
    assert len(distinct) == len(samples)
    slide_mpp = {"generic40x": 0.25, "aperio40x": 0.25, "scan20x": 0.5, "CMU-1-Small-Region": 0.499}
    for key, meta, jpeg in samples:
        assert set(META_FIELDS) <= meta.keys()
        assert "." not in key and re.fullmatch(r"[A-Za-z0-9_-]+_\d{5}_\d{7}_\d{7}", key)
        assert key == f"{meta['slide_id']}_{round(meta['mpp'] * 1000):05d}_{meta['x']:07d}_{meta['y']:07d}"
        img = Image.open(io.BytesIO(jpeg))
        assert img.format == "JPEG" and img.size == (256, 256) and img.mode == "RGB"
        # Field of view: tile side in µm is tile_size * target µm/px, within the 5 % level tolerance.
        fov = meta["extent"] * slide_mpp[meta["slide_id"]]
        assert fov == pytest.approx(256 * meta["mpp"], rel=0.02)
        assert meta["foreground"] >= 0.4 and meta["hsv_fraction"] >= 0.6
        assert meta["tile_size"] == 256 and meta["group"] == "default" and meta["seed"] == 0
    assert {m["mpp"] for _, m, _ in samples} == {2.0, 1.0, 0.5, 0.25}
    # 0.25 µm/px only from the 40x slides (never upsampled from 20x).
    assert {m["slide_id"] for _, m, _ in samples if m["mpp"] == 0.25} == {"generic40x", "aperio40x"}
    # Tiles of several slides are shuffled together into each shard.
    first = read_first_shard_slides(out)
    assert len(first) >= 2


def read_first_shard_slides(out: Path) -> set[str]:
    import webdataset as wds

    url = str(sorted((out / "shards").glob("*.tar"))[0])
    return {json.loads(s["json"])["slide_id"] for s in wds.WebDataset(url, shardshuffle=False)}


def test_build_reports_every_problem_and_still_finishes(full_build):
    out, done = full_build
    assert done.returncode == 1, done.stdout + done.stderr  # some slides failed
    report = done.stdout
    for bad, why in [("nompp", "µm/px"), ("corrupt", "OpenSlide"), ("notaslide", "OpenSlide"),
                     ("damaged", "")]:
        assert re.search(rf"{bad} \(.*\): .*{why}", report), (bad, report)
    assert re.search(r"scan20x @ 0.25 µm/px: finest level is 0.5", report)
    assert re.search(r"CMU-1-Small-Region @ 0.25 µm/px", report)
    assert re.search(r"glass @ \d+ µm/px: 0/12", report)  # shortfall: no tissue at all
    assert "rejected candidates" in report and "tiles/s per core" in report
    manifests = [json.loads(p.read_text()) for p in (out / "manifests").glob("*.json")]
    assert sum(m["samples"] for m in manifests) == len(read_samples(out))
    for m in manifests:
        for shard in m["shards"]:
            data = (out / shard["name"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"] and len(data) == shard["bytes"]
    # Good slides got their full quota at every magnification they can provide.
    per_slide = {s["slide_id"]: s for m in manifests for s in m["slides"]}
    assert per_slide["generic40x"]["written"] == {"2": 12, "1": 12, "0.5": 12, "0.25": 12}
    assert per_slide["nompp"]["status"] == "failed"


def test_status_and_inspect(full_build, tmp_path):
    out, _ = full_build
    st = prep("status", out)
    assert st.returncode == 1 and re.search(r"(\d+)/\1 jobs done, 0 left", st.stdout)
    data = json.loads(prep("status", out, "--json").stdout)
    assert data["left"] == [] and data["samples"] > 0
    png = tmp_path / "sheet.png"
    shard = sorted((out / "shards").glob("*.tar"))[0]
    ins = prep("inspect", shard, "--out", png, "--count", 16, check=0)
    assert "samples" in ins.stdout and "per µm/px" in ins.stdout
    assert Image.open(png).size[0] == 8 * 160


def test_same_shards_whatever_the_worker_count(slide_dir, tmp_path):
    slides = [slide_dir / n for n in GOOD]
    args = ["--tiles-per-slide", 24, "--shard-size", 10, "--slides-per-job", 1, "--seed", 7]
    prep("build", *slides, "-o", tmp_path / "a", "--workers", 1, *args, check=0)
    prep("build", *slides, "-o", tmp_path / "b", "--workers", 3, *args, check=0)
    a, b = shard_digests(tmp_path / "a"), shard_digests(tmp_path / "b")
    assert a and a == b
    prep("build", *slides, "-o", tmp_path / "c", "--workers", 1, *args[:-1], 8, check=0)
    assert shard_digests(tmp_path / "c") != a  # the seed matters


def test_resume_after_kill_gives_the_clean_result(slide_dir, cmu_slide, tmp_path):
    slides = [*(slide_dir / n for n in GOOD), cmu_slide]
    args = ["--tiles-per-slide", 60, "--shard-size", 16, "--slides-per-job", 1]
    prep("build", *slides, "-o", tmp_path / "clean", *args, check=0)
    clean = shard_digests(tmp_path / "clean")
    out = tmp_path / "killed"
    rnd = random.Random(3)
    for _ in range(3):
        proc = subprocess.Popen([*CLI, "build", *map(str, slides), "-o", str(out), *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rnd.uniform(1.0, 4.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Whatever is visible is either absent or complete: a shard listed in a manifest is intact.
        for mf in (out / "manifests").glob("*.json") if (out / "manifests").exists() else []:
            for shard in json.loads(mf.read_text())["shards"]:
                assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    resumed = prep("build", *slides, "-o", out, *args, check=0)
    assert "jobs already done" in resumed.stderr
    assert shard_digests(out) == clean
    assert not list(out.rglob("*.partial"))


def test_plan_then_run_as_array_tasks(slide_dir, tmp_path):
    out = tmp_path / "out"
    slides = [slide_dir / n for n in GOOD]
    p = prep("plan", *slides, "-o", out, "--tiles-per-slide", 8, "--slides-per-job", 1, check=0)
    assert "4 jobs" in p.stdout
    prep("run", out / "plan.json", "--task", 1, "--num-tasks", 2, check=0)
    st = json.loads(prep("status", out, "--json").stdout)
    assert st["done"] == 2 and st["left"] == ["job-000000", "job-000002"]
    prep("run", out, "--task", 0, "--num-tasks", 2, check=0)
    assert json.loads(prep("status", out, "--json").stdout)["left"] == []
    # A different plan into the same output is refused instead of mixing two datasets.
    clash = prep("build", *slides, "-o", out, "--tiles-per-slide", 9)
    assert clash.returncode == 2 and "different plan" in clash.stderr


@pytest.mark.parametrize("case", ["no-slides", "bad-csv", "unwritable", "duplicate-ids"])
def test_bad_input_is_a_clear_error(case, slide_dir, tmp_path):
    if case == "no-slides":
        (tmp_path / "empty").mkdir()
        done = prep("build", tmp_path / "empty", "-o", tmp_path / "o")
        assert done.returncode == 2 and "no slide files" in done.stderr
    elif case == "bad-csv":
        (tmp_path / "l.csv").write_text("file,mpp\nx.svs,0.5\n")
        done = prep("build", tmp_path / "l.csv", "-o", tmp_path / "o")
        assert done.returncode == 2 and "'path' column" in done.stderr
    elif case == "unwritable":
        (tmp_path / "afile").write_text("")
        done = prep("build", slide_dir / "glass.tiff", "-o", tmp_path / "afile" / "out")
        assert done.returncode == 1 and "cannot write" in done.stderr
    else:
        (tmp_path / "l.csv").write_text(f"path,slide_id\n{slide_dir / 'glass.tiff'},x\n{slide_dir / 'scan20x.tiff'},x\n")
        done = prep("build", tmp_path / "l.csv", "-o", tmp_path / "o")
        assert done.returncode == 2 and "unique" in done.stderr


def test_slide_list_csv_with_override_and_group(slide_dir, tmp_path):
    (tmp_path / "l.csv").write_text(f"path,slide_id,mpp,group\n{slide_dir / 'nompp.tiff'},TCGA.AB.1,0.25,tcga\n")
    out = tmp_path / "o"
    prep("build", tmp_path / "l.csv", "-o", out, "--tiles-per-slide", 8, "--mpp", "1,0.5", check=0)
    samples = read_samples(out)
    assert samples and {m["slide_id"] for _, m, _ in samples} == {"TCGA-AB-1"}
    assert {m["group"] for _, m, _ in samples} == {"tcga"}
    assert all(np.isclose(m["extent"] * 0.25, 256 * m["mpp"]) for _, m, _ in samples)


def test_output_to_an_fsspec_url(slide_dir):
    """Nothing assumes a local output: build into fsspec's in-memory filesystem (in-process, as
    memory:// is per process), then read shards, manifests and status back through fsspec."""
    import fsspec
    from click.testing import CliRunner

    from midnight_prep.cli import main
    from midnight_prep.shards import iter_tiles

    url = "memory://bucket/run1"
    args = [str(slide_dir / "generic40x.tiff"), "-o", url, "--tiles-per-slide", 8, "--shard-size", 5]
    result = CliRunner().invoke(main, ["build", *map(str, args)])
    assert result.exit_code == 0, result.output
    fs = fsspec.filesystem("memory")
    names = sorted(fs.ls("/bucket/run1/shards", detail=False))
    assert [n.rsplit("/", 1)[-1] for n in names] == ["job-000000-0000.tar", "job-000000-0001.tar"]
    samples = [s for n in names for s in iter_tiles("memory://" + n)]
    assert len(samples) == 8 and all(meta["slide_id"] == "generic40x" for _, _, meta in samples)
    status = CliRunner().invoke(main, ["status", url, "--json"])
    assert json.loads(status.output)["left"] == []
    again = CliRunner().invoke(main, ["build", *map(str, args)])  # resume: nothing left to do
    assert again.exit_code == 0 and "1 of 1 jobs already done" in again.output


def test_no_file_handles_leak_across_slides(slide_dir, cmu_slide):
    """Long-running workers open thousands of slides: each one's handles (OpenSlide and the
    fast TIFF reader) are closed when it is done, failed slides included."""
    from midnight_prep.job import process_slide
    from midnight_prep.plan import BuildParams, SlideSpec

    params = BuildParams(mpps=(1.0,))
    specs = [SlideSpec(str(p), p.stem, quotas={"1": 4}) for p in
             (slide_dir / "generic40x.tiff", slide_dir / "aperio40x.svs", slide_dir / "damaged.tiff",
              slide_dir / "corrupt.svs", cmu_slide)]
    process_slide(specs[0], params, lambda *a: None)  # warm up library-level handles
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        for spec in specs:
            process_slide(spec, params, lambda *a: None)
    assert len(os.listdir("/proc/self/fd")) == before

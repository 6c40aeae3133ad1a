"""`status` of a run in flight: jobs and slides done, running (a live lock held by a process of
this host, with the progress its heartbeat carries), left, failed and damaged; tiles per µm/px;
throughput and a projected finish once a job has finished."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from midnight_prep import locks
from midnight_prep.cli import main

OPTS = ["--tiles-per-slide", "16", "--mpp", "1,0.5", "--slides-per-job", "1", "--shard-size", "3"]


def prep(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def status(out) -> tuple[int, dict, str]:
    data = prep("status", out, "--json")
    text = prep("status", out)
    return data.exit_code, json.loads(data.output), text.output


def test_status_of_a_partial_run(slide_dir, cmu_slide, tmp_path):
    out = tmp_path / "out"
    # Jobs in slide-id order: 0 CMU, 1 aperio40x, 2 corrupt (fails), 3 generic40x, 4 scan20x.
    slides = [cmu_slide, *(slide_dir / n for n in ("aperio40x.svs", "corrupt.svs", "generic40x.tiff",
                                                   "scan20x.tiff"))]
    assert prep("plan", *slides, "-o", out, *OPTS).exit_code == 0

    code, st, text = status(out)
    assert code == 0 and st["counts"]["jobs"]["left"] == 5 and st["throughput"]["tiles_per_s"] is None
    assert st["projection"] == {"tiles_left": 80, "seconds": None, "finish_at": None}
    assert "throughput: unknown until a job has finished; 80 tiles left, finish unknown" in text

    ran = prep("run", out, "--jobs", "job-000000,job-000001,job-000002")
    assert ran.exit_code == 1, ran.output  # the corrupt slide failed
    manifests = {p.stem: json.loads(p.read_text()) for p in (out / "manifests").glob("*.json")}
    assert all(m["started_at"] <= m["finished_at"] for m in manifests.values())
    shard = out / manifests["job-000001"]["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:100])  # job 1 is now damaged

    lock = locks.acquire(locks.lock_url(str(out), "job-000003"), "job-000003")
    assert isinstance(lock, locks.Lock)
    try:
        count = lock.counting(None)
        count("tiles", 5)
        lock.refresh()  # what the heartbeat does every HEARTBEAT_S
        code, st, text = status(out)
    finally:
        lock.release()
    assert code == 1  # a failed slide and a damaged job
    assert st["counts"]["jobs"] == {"done": 2, "running": 1, "left": 1, "damaged": 1, "foreign": 0,
                                    "total": 5, "with_failed_slides": 1}
    assert st["counts"]["slides"] == {"total": 5, "done": 2, "failed": 1, "running": 1,
                                      "running_done": 0, "left": 2}
    assert st["done"] == 2 and st["left"] == ["job-000001", "job-000003", "job-000004"]  # as before
    assert list(st["damaged"]) == ["job-000001"] and st["failed"][0][0] == "corrupt"
    run = st["running"]["job-000003"]
    assert (run["host"], run["pid"], run["tiles_done"], run["tiles_asked"]) == (locks.HOST, os.getpid(), 5, 16)
    assert 0 <= run["heartbeat_age_s"] < 30 and st["locks"]["job-000003"]["stale"] is False
    written = sum(manifests["job-000000"]["slides"][0]["written"].values())
    assert st["samples"] == written > 0
    assert st["per_mpp"]["1"]["asked"] == 40 and st["per_mpp"]["0.5"]["left"] == 24
    assert sum(r["written"] for r in st["per_mpp"].values()) == written
    rate = st["throughput"]["tiles_per_s"]
    assert rate > 0 and st["throughput"]["tiles_per_s_per_job"] > 0
    assert st["throughput"]["bytes_per_tile"] == round(
        sum(e["bytes"] for e in manifests["job-000000"]["shards"]) / written)
    left = 3 * 16 - 5  # jobs 1 (damaged), 3 (5 tiles so far) and 4
    assert st["projection"]["tiles_left"] == left
    assert abs(st["projection"]["seconds"] - left / rate) <= 1
    assert "5/5 jobs done" not in text and "2/5 jobs done, 3 left" in text
    assert "2 done (1 with failed slides), 1 running, 1 left, 1 damaged" in text
    assert "job-000003: being built by" in text and "0/1 slides, 5/16 tiles" in text
    assert "projected finish in" in text and "once builders run again" not in text
    assert "job-000001: shard" in text and "corrupt" in text
    header = next(line for line in text.splitlines() if "µm/px" in line and "written" in line)
    assert header.split() == ["µm/px", "asked", "done", "jobs", "written", "left"]

    # The builder is gone: nothing runs, the projection says so.
    code, st, text = status(out)
    assert st["counts"]["jobs"]["running"] == 0 and st["running"] == {}
    assert "once builders run again" in text

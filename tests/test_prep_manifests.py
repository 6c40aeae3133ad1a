"""Manifests are checked against the plan: results of another plan are never taken as done."""

import json

from click.testing import CliRunner

from midnight_prep.cli import main

FAST = ["--tiles-per-slide", "4", "--mpp", "1", "--slides-per-job", "1"]


def prep(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_results_of_another_plan_are_refused(slide_dir, tmp_path):
    out = tmp_path / "out"
    first = prep("build", slide_dir / "scan20x.tiff", slide_dir / "generic40x.tiff", "-o", out, *FAST)
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "manifests" / "job-000000.json").read_text())
    assert len(manifest["plan_sha256"]) == 64
    assert [s["slide_id"] for s in manifest["slides"]] == ["generic40x"]
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}

    (out / "plan.json").unlink()
    # Other slides: job-000000 would be aperio40x now, yet its manifest says generic40x.
    other = prep("build", slide_dir / "aperio40x.svs", slide_dir / "scan20x.tiff", "-o", out, *FAST)
    assert other.exit_code == 2, other.output
    assert "manifests/job-000000.json belongs to another plan" in other.output
    assert "generic40x" in other.output and "nothing was run" in other.output
    assert not (out / "plan.json").exists()
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == before
    # Other options, same slides: refused as well.
    seed = prep("build", slide_dir / "scan20x.tiff", slide_dir / "generic40x.tiff", "-o", out, *FAST,
                "--seed", 5)
    assert seed.exit_code == 2 and "another plan" in seed.output
    # Fewer slides: the extra job's manifest would feed training with shards of no plan.
    fewer = prep("build", slide_dir / "generic40x.tiff", "-o", out, *FAST)
    assert fewer.exit_code == 2 and "job-000001.json" in fewer.output

    # The same plan again (plan.json deleted, or ./out given another way) is simply resumed.
    again = prep("build", slide_dir / "generic40x.tiff", slide_dir / "scan20x.tiff", "-o", out, *FAST)
    assert again.exit_code == 0 and "2 of 2 jobs already done" in again.output


def test_status_names_foreign_manifests(slide_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out, seed in ((a, 1), (b, 2)):
        done = prep("build", slide_dir / "scan20x.tiff", "-o", out, *FAST, "--seed", seed)
        assert done.exit_code == 0, done.output
    # A manifest copied in from another output (say, two runs synced into one bucket).
    (a / "manifests" / "job-000000.json").write_bytes((b / "manifests" / "job-000000.json").read_bytes())
    status = prep("status", a)
    assert status.exit_code == 1, status.output
    assert "0/1 jobs done, 1 left" in status.output and "belongs to another plan" in status.output
    data = json.loads(prep("status", a, "--json").output)
    assert data["done"] == 0 and list(data["foreign"]) == ["job-000000"]
    run = prep("run", a)
    assert run.exit_code == 2 and "another plan" in run.output

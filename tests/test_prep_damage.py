"""`status` checks the shards a manifest lists (sizes; sha256 with --verify) and `build`/`run`
redo a damaged job, with the same bytes as before."""

import hashlib
import json

from click.testing import CliRunner

from midnight_prep import jobstate
from midnight_prep.cli import main

ARGS = ["--tiles-per-slide", "12", "--mpp", "1,0.5", "--slides-per-job", "1", "--shard-size", "5"]


def prep(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digests(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def test_damaged_jobs_are_found_and_redone(slide_dir, tmp_path):
    out = tmp_path / "out"
    slides = [slide_dir / "scan20x.tiff", slide_dir / "generic40x.tiff"]
    assert prep("build", *slides, "-o", out, *ARGS).exit_code == 0
    clean = digests(out)
    assert len(clean) >= 4
    shard = out / "shards" / "job-000001-0001.tar"

    damage = {
        "missing": lambda: shard.unlink(),
        "truncated": lambda: shard.write_bytes(shard.read_bytes()[:1000]),
        "corrupt manifest": lambda: (out / "manifests" / "job-000001.json").write_text("{"),
    }
    for what, make in damage.items():
        make()
        status = prep("status", out)
        assert status.exit_code == 1, (what, status.output)
        assert "1/2 jobs done, 1 left" in status.output and "Traceback" not in status.output
        assert "job-000001: " in status.output and "damaged" in status.output
        assert json.loads(prep("status", out, "--json").output)["damaged"].keys() == {"job-000001"}
        again = prep("build", *slides, "-o", out, *ARGS)
        assert again.exit_code == 0, (what, again.output)
        assert "job-000001 is damaged" in again.output
        assert digests(out) == clean, what
        assert prep("status", out).exit_code == 0

    # Same size, other bytes: only --verify reads the shards and sees it.
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert prep("status", out).exit_code == 0
    verified = prep("status", out, "--verify")
    assert verified.exit_code == 1 and "does not match the sha256" in verified.output
    assert prep("run", out).exit_code == 0 and digests(out) != clean  # a plain run trusts sizes
    redone = prep("run", out, "--verify")
    assert redone.exit_code == 0 and "job-000001 is damaged" in redone.output
    assert digests(out) == clean


def test_many_shards_are_sized_from_one_listing(slide_dir, tmp_path, monkeypatch):
    """Past jobstate.LOOKUPS shards, sizes come from one listing of shards/ (a whole output on
    object storage): the same verdicts."""
    out = tmp_path / "out"
    assert prep("build", slide_dir / "scan20x.tiff", "-o", out, *ARGS).exit_code == 0
    monkeypatch.setattr(jobstate, "LOOKUPS", 0)
    assert prep("status", out).exit_code == 0
    (out / "shards" / "job-000000-0001.tar").unlink()
    status = prep("status", out)
    assert status.exit_code == 1 and "shard shards/job-000000-0001.tar is missing" in status.output


def test_a_redone_job_leaves_no_stale_shards(slide_dir, tmp_path):
    """A redone job with fewer shards than an earlier run of it (a slide that gave tiles then
    fails now, say) removes the earlier run's extra shards: a glob over shards/ sees no stale tiles."""
    out = tmp_path / "out"
    assert prep("build", slide_dir / "scan20x.tiff", "-o", out, *ARGS).exit_code == 0
    clean = digests(out)
    n = len(clean)
    for k in (n, n + 1):  # what a bigger earlier run left
        (out / "shards" / f"job-000000-{k:04d}.tar").write_bytes(b"stale")
    (out / "manifests" / "job-000000.json").unlink()
    assert prep("build", slide_dir / "scan20x.tiff", "-o", out, *ARGS).exit_code == 0
    assert digests(out) == clean

"""Exit status: not 0 while a slide of the plan has failed or nothing was written; a fixed slide
is retried on request."""

import shutil

from click.testing import CliRunner

from midnight_prep.cli import main

FAST = ["--tiles-per-slide", "4", "--mpp", "1"]


def prep(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_failed_slide_keeps_failing_until_retried(slide_dir, tmp_path):
    slide = tmp_path / "late.tiff"  # listed, but not copied in yet
    (tmp_path / "list.csv").write_text(f"path\n{slide}\n{slide_dir / 'scan20x.tiff'}\n")
    out = tmp_path / "out"
    first = prep("build", tmp_path / "list.csv", "-o", out, *FAST)
    assert first.exit_code == 1 and "late (" in first.output and "file not found" in first.output
    rerun = prep("build", tmp_path / "list.csv", "-o", out, *FAST)
    assert rerun.exit_code == 1, rerun.output  # nothing ran, but the plan still has a failed slide
    assert "1 slide(s) failed in an earlier run (first: late: file not found" in rerun.output
    assert "--retry-failed" in rerun.output
    shutil.copy(slide_dir / "generic40x.tiff", slide)
    fixed = prep("run", out, "--retry-failed")
    assert fixed.exit_code == 0, fixed.output
    assert "job-000000: retrying its 1 failed slide(s)" in fixed.output
    status = prep("status", out, "--json")
    assert status.exit_code == 0 and '"failed": []' in status.output


def test_no_tile_at_all_is_a_failure(slide_dir, tmp_path):
    glass = prep("build", slide_dir / "glass.tiff", "-o", tmp_path / "a", *FAST)
    assert glass.exit_code == 1 and "no tiles were written (4 asked)" in glass.output
    strict = prep("build", slide_dir / "scan20x.tiff", "-o", tmp_path / "b", *FAST, "--hsv-min-fraction", 1)
    assert strict.exit_code == 1 and "no tiles were written" in strict.output

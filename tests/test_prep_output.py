"""Where results go: the folder the plan is in, whatever the working directory or the spelling."""

from click.testing import CliRunner

from midnight_prep.cli import main

FAST = ["--tiles-per-slide", "4", "--mpp", "1"]


def prep(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_results_go_next_to_the_plan(slide_dir, tmp_path, monkeypatch):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    assert prep("plan", slide_dir / "scan20x.tiff", "-o", "out", *FAST).exit_code == 0
    monkeypatch.chdir(elsewhere)
    run = prep("run", here / "out" / "plan.json")
    assert run.exit_code == 0, run.output
    assert len(list((here / "out" / "shards").glob("*.tar"))) == 1
    assert not (elsewhere / "out").exists()

    # A moved output is continued where it is now, and the move is mentioned.
    (here / "out").rename(tmp_path / "moved")
    (tmp_path / "moved" / "manifests" / "job-000000.json").unlink()
    moved = prep("run", tmp_path / "moved")
    assert moved.exit_code == 0, moved.output
    assert f"it is now in {tmp_path / 'moved'}" in moved.output
    assert (tmp_path / "moved" / "manifests" / "job-000000.json").exists()
    assert not (here / "out").exists()
    status = prep("status", tmp_path / "moved")
    assert status.exit_code == 0 and "1/1 jobs done" in status.output


def test_one_output_spelled_two_ways_is_one_plan(slide_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert prep("plan", slide_dir / "scan20x.tiff", "-o", "./out/", *FAST).exit_code == 0
    again = prep("build", slide_dir / "scan20x.tiff", "-o", tmp_path / "out", *FAST)
    assert again.exit_code == 0, again.output
    assert "different plan" not in again.output
    assert prep("build", slide_dir / "scan20x.tiff", "-o", f"file://{tmp_path}/out", *FAST).exit_code == 0

"""Every build parameter is checked before any work: a bad value is one clear line naming the
option (exit 2), nothing is written, and no tile is silently lost."""

import json

import pytest
from click.testing import CliRunner

from midnight_prep.cli import main

BAD = [
    (["--shard-size", "-3"], "--shard-size"),
    (["--shard-size", "0"], "--shard-size"),
    (["--tile-size", "-5"], "--tile-size"),
    (["--tile-size", "0"], "--tile-size"),
    (["--tiles-per-slide", "0"], "--tiles-per-slide"),
    (["--tiles-per-slide", "-2"], "--tiles-per-slide"),
    (["--total-tiles", "0"], "--total-tiles"),
    (["--slides-per-job", "0"], "--slides-per-job"),
    (["--workers", "0"], "--workers"),
    (["--seed", "-1"], "--seed"),
    (["--hsv-min-fraction", "1.5"], "--hsv-min-fraction"),
    (["--hsv-min-fraction", "-0.1"], "--hsv-min-fraction"),
    (["--foreground", "1.2"], "--foreground"),
    (["--foreground", "nan"], "--foreground"),
    (["--mpp", "nan"], "--mpp"),
    (["--mpp", "inf"], "--mpp"),
    (["--mpp", "1,-1"], "--mpp"),
    (["--mpp", "0"], "--mpp"),
    (["--mpp", "1,1"], "--mpp"),
    (["--mpp", "0.5,0.5001"], "--mpp"),  # the same sample key: every tile twice
]


@pytest.mark.parametrize("args,option", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_values_are_refused_before_any_work(args, option, slide_dir, tmp_path):
    out = tmp_path / "out"
    quota = [] if "--total-tiles" in args else ["--tiles-per-slide", "8"]
    result = CliRunner().invoke(main, ["build", str(slide_dir / "scan20x.tiff"), "-o", str(out),
                                       *quota, *args])
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output
    assert not out.exists()  # no plan.json, no empty manifest that would count as done


def test_a_hand_edited_plan_is_checked_too(slide_dir, tmp_path):
    out = tmp_path / "out"
    done = CliRunner().invoke(main, ["plan", str(slide_dir / "scan20x.tiff"), "-o", str(out),
                                     "--tiles-per-slide", "8"])
    assert done.exit_code == 0, done.output
    plan = json.loads((out / "plan.json").read_text())
    plan["params"]["shard_size"] = -3
    (out / "plan.json").write_text(json.dumps(plan))
    result = CliRunner().invoke(main, ["run", str(out)])
    assert result.exit_code == 1 and "--shard-size" in result.output and "-3" in result.output
    assert not (out / "manifests").exists()

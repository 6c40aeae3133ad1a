"""A huge quota is capped per (slide, µm/px) by the tissue area, and the shortfall reported."""

import json
import subprocess
import sys

from midnight_prep.job import foreground_map, tile_cap
from midnight_prep.plan import BuildParams
from midnight_prep.slides import Slide

CLI = [sys.executable, "-m", "midnight_prep.cli"]


def test_ten_million_tiles_stop_at_what_the_tissue_gives(cmu_slide, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([*CLI, "build", cmu_slide, "-o", out, "--tiles-per-slide", "10000000",
                           "--mpp", "2,1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    params = BuildParams(mpps=(2.0, 1.0))
    with Slide(cmu_slide) as slide:
        fg = foreground_map(slide, params)
        caps = {f"{m:g}": tile_cap(fg, slide, 256 * m / slide.mpp, params) for m in params.mpps}
        # 16 x tissue area / tile area: the sample slide's third of tissue at 2 and 1 µm/px.
        assert fg.area / (slide.width * slide.height) > 0.2
    assert 10 < caps["2"] < 100 and 4 * caps["2"] <= caps["1"] + 4 < 400
    report = json.loads((out / "manifests" / "job-000000.json").read_text())["slides"][0]
    assert report["capped"] == caps and report["asked"] == {"2": 5000000, "1": 5000000}
    assert all(0.9 * caps[m] <= report["written"][m] <= caps[m] for m in caps)
    assert f"CMU-1-Small-Region @ 2 µm/px: {report['written']['2']}/5000000 (at most {caps['2']}" in done.stdout

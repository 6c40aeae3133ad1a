"""A fluorescence slide (dark background, DAPI-blue nuclei that pass the HSV filter) is not
taken for H&E: the builder skips it with its reason, named in the summary, and online patching
(the same `slide_mask`) refuses it too."""

import json
import subprocess
import sys

import numpy as np
import pytest

from midnight_prep.hsv import hsv_fraction
from midnight_prep.job import slide_mask
from midnight_prep.plan import BuildParams, SlideSpec
from midnight_prep.samples import fluorescence, write_pyramid
from midnight_prep.slides import Slide, SlideError
from midnight_prep.staging import SlideCache

CLI = [sys.executable, "-m", "midnight_prep.cli"]
FAST = ["--tiles-per-slide", "8", "--mpp", "1", "--slides-per-job", "2", "--shard-size", "5"]


@pytest.fixture(scope="module")
def dapi(tmp_path_factory):
    path = tmp_path_factory.mktemp("fluo") / "dapi.tiff"
    image = fluorescence(2048, 2048)
    # What makes it dangerous: its tissue passes the colour filter of H&E.
    assert hsv_fraction(image[900:1156, 900:1156]) > 0.6
    return write_pyramid(path, image, mpp=0.25)


def test_a_fluorescence_slide_is_skipped_with_its_reason(dapi, slide_dir, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([*CLI, "build", dapi, slide_dir / "generic40x.tiff", "-o", out, *FAST],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # a slide could not be used
    assert "dapi" in done.stdout and "not a brightfield (H&E) slide" in done.stdout
    slides = {s["slide_id"]: s for m in (out / "manifests").glob("*.json")
              for s in json.loads(m.read_text())["slides"]}
    assert slides["dapi"]["status"] == "failed" and sum(slides["dapi"]["written"].values()) == 0
    assert slides["generic40x"]["status"] == "ok"
    assert sum(slides["generic40x"]["written"].values()) == 8


def test_online_patching_refuses_it_and_brightfield_passes(dapi, slide_dir, tmp_path):
    from midnight_train.data.open_slides import MaskStore, SlideEntry

    params = BuildParams(mpps=(1.0,))
    cache = SlideCache(str(tmp_path / "stage"))
    with pytest.raises(SlideError, match="not a brightfield"):  # as the loader opens a slide
        SlideEntry(SlideSpec(str(dapi), "dapi"), params, MaskStore(None), 0, cache)
    SlideEntry(SlideSpec(str(slide_dir / "generic40x.tiff"), "g"), params, MaskStore(None), 0,
               cache).close()
    with Slide(str(dapi)) as slide, pytest.raises(SlideError, match="median brightness"):
        slide_mask(slide, params)
    for name in ("generic40x.tiff", "glass.tiff", "scan20x.tiff"):  # H&E and empty glass
        with Slide(str(slide_dir / name)) as slide:
            mask, _ = slide_mask(slide, params)
            assert mask.dtype == np.bool_

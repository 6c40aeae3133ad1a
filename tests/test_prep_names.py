"""Slide ids: names without ASCII letters stay apart, and a symlinked slide keeps the link's name."""

import json
import os
import shutil

from click.testing import CliRunner

from midnight_prep.cli import main
from midnight_prep.shards import safe_slide_id


def test_slide_ids():
    assert safe_slide_id("TCGA-AB-1234.01.svs") == "TCGA-AB-1234-01-svs"
    assert safe_slide_id("Präparat_é") == "Praparat_e"
    ids = {safe_slide_id(n) for n in ("幻灯片", "スライド", "슬라이드", "...")}
    assert len(ids) == 4 and all(i.startswith("slide-") and len(i) == 16 for i in ids)
    assert safe_slide_id("幻灯片") == safe_slide_id("幻灯片")  # stable


def test_plan_keeps_names_apart_and_links_named(slide_dir, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(slide_dir / "scan20x.tiff", slides / "幻灯片.tiff")
    shutil.copy(slide_dir / "scan20x.tiff", slides / "スライド.tiff")
    os.symlink(slide_dir / "generic40x.tiff", slides / "patient-7.tiff")  # found in a directory
    os.symlink(slide_dir / "aperio40x.svs", tmp_path / "link-b.svs")  # given by name
    done = CliRunner().invoke(main, ["plan", str(slides), str(tmp_path / "link-b.svs"), "-o",
                                     str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    by_id = {s["slide_id"]: s["path"] for job in plan["jobs"] for s in job["slides"]}
    assert by_id["patient-7"] == str(slides / "patient-7.tiff")  # the link, not generic40x
    assert by_id["link-b"] == str(tmp_path / "link-b.svs")
    assert len([i for i in by_id if i.startswith("slide-")]) == 2

"""The tcga-100M recipe's slide-list tool keeps FFPE diagnostic slides only, and its output is a
slide list that midnight-prep reads."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gdc_manifest_to_ffpe_slide_list(tmp_path):
    manifest = tmp_path / "gdc_manifest.txt"
    rows = [("id", "filename", "md5", "size", "state"),
            ("0a1b2c3d-1111", "TCGA-A1-A0SB-01Z-00-DX1.8E6E4A49-9A9B-4F46-9F1E-0D5D0E0F1A2B.svs", "m", "1", "released"),
            ("0a1b2c3d-2222", "TCGA-A1-A0SB-01A-01-TS1.11111111-2222-3333-4444-555555555555.svs", "m", "1", "released"),
            ("0a1b2c3d-3333", "TCGA-A1-A0SB-01A-01-BS1.11111111-2222-3333-4444-555555555556.svs", "m", "1", "released"),
            ("0a1b2c3d-4444", "TCGA-B6-A0RU-01Z-00-DX2.22222222-2222-3333-4444-555555555555.svs", "m", "1", "released"),
            ("0a1b2c3d-5555", "nationwidechildrens.org_clinical.txt", "m", "1", "released")]
    manifest.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    done = subprocess.run([sys.executable, str(ROOT / "examples/tcga-100M/gdc_slides.py"), str(manifest),
                           "--root", "s3://bucket/tcga/"], capture_output=True, text=True, check=True)
    slides = list(csv.DictReader(io.StringIO(done.stdout)))
    assert [s["path"] for s in slides] == [
        "s3://bucket/tcga/0a1b2c3d-1111/TCGA-A1-A0SB-01Z-00-DX1.8E6E4A49-9A9B-4F46-9F1E-0D5D0E0F1A2B.svs",
        "s3://bucket/tcga/0a1b2c3d-4444/TCGA-B6-A0RU-01Z-00-DX2.22222222-2222-3333-4444-555555555555.svs"]
    assert slides[0]["slide_id"] == "TCGA-A1-A0SB-01Z-00-DX1-0a1b2c3d" and {s["group"] for s in slides} == {"tcga"}
    assert "kept 2 FFPE diagnostic slides; left out 2 frozen sections and 1 other files" in done.stderr
    from midnight_prep.plan import read_slide_list  # the prep tool reads the list as written

    listed = tmp_path / "slides.csv"
    listed.write_text(done.stdout)
    assert [r["slide_id"] for r in read_slide_list(listed)] == [s["slide_id"] for s in slides]

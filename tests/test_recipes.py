"""The tcga-100M recipe: its slide-list tool keeps FFPE diagnostic slides only, into a slide list
that midnight-prep reads; `plan --estimate` prints its cost model from a GDC manifest; `plan
--dry-run` checks it on a stand-in list (slides, µm/px, output storage)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def _gdc_manifest(path, n_ffpe: int, n_frozen: int) -> list[int]:
    """A GDC manifest of ``n_ffpe`` DX slides (sizes returned) and ``n_frozen`` TS slides."""
    rows, sizes = [("id", "filename", "md5", "size", "state")], []
    for i in range(n_ffpe + n_frozen):
        kind = "DX1" if i < n_ffpe else "TS1"
        size = 600_000_000 + 7_919 * i
        rows.append((f"{i:08x}-0000", f"TCGA-A1-{i:04d}-01Z-00-{kind}.{i:08X}-2222-3333-4444-555555555555.svs",
                     "m", str(size), "released"))
        if i < n_ffpe:
            sizes.append(size)
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    return sizes


def test_tcga_estimate_from_a_gdc_manifest(tmp_path):
    """The recipe's cost model from a GDC manifest, before any slide is downloaded: the numbers
    follow from the plan and the measured constants."""
    import math

    from midnight_prep.estimate import TILES_PER_CORE_S, bytes_per_tile

    manifest = tmp_path / "gdc_manifest.txt"
    sizes = _gdc_manifest(manifest, 203, 17)
    listed = subprocess.run([sys.executable, str(ROOT / "examples/tcga-100M/gdc_slides.py"), str(manifest),
                             "--root", "/data/tcga"], capture_output=True, text=True, check=True)
    (tmp_path / "slides.csv").write_text(listed.stdout)
    out = tmp_path / "never-written"
    args = [sys.executable, "-m", "midnight_prep.cli", "plan", str(tmp_path / "slides.csv"), "-o", str(out),
            "--total-tiles", "1000000", "--shard-size", "700", "--slides-per-job", "8", "--estimate",
            "--nodes", "3", "--cores-per-node", "5", "--slide-sizes", str(manifest)]
    e = json.loads(subprocess.run([*args, "--json"], capture_output=True, text=True, check=True).stdout)["estimate"]
    assert not out.exists()  # --estimate writes nothing
    per_slide = [1_000_000 // 203 + (i < 1_000_000 % 203) for i in range(203)]
    per_job = [sum(per_slide[i:i + 8]) for i in range(0, 203, 8)]
    assert (e["slides"], e["jobs"], e["tiles"]) == (203, 26, 1_000_000)
    assert sum(e["tiles_per_mpp"].values()) == 1_000_000 and e["tiles_per_job"]["max"] == max(per_job)
    assert e["shards"] == sum(math.ceil(n / 700) for n in per_job)
    slow, fast = TILES_PER_CORE_S
    assert e["core_hours"] == {"low": pytest.approx(1e6 / fast / 3600), "high": pytest.approx(1e6 / slow / 3600)}
    # 26 jobs on 15 cores: two rounds of the biggest jobs, at least a 15th of the CPU time.
    assert e["core_hours"]["high"] / 15 <= e["wall_hours"]["high"] <= 2 * max(per_job) / slow / 3600 + 1e-9
    assert e["slide_bytes"] == sum(sizes) and e["slides_of_unknown_size"] == 0
    assert e["storage_bytes"] == pytest.approx(sum(n * bytes_per_tile(256, float(m))
                                                   for m, n in e["tiles_per_mpp"].items()), abs=1)
    text = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert "1,000,000 asked" in text and f"{e['shards']:,} of at most 700 tiles" in text
    assert "on 3 node(s) x 5 cores" in text and "core-hours" in text and "slides read" in text


def test_recipe_dry_run_on_a_stand_in_list(slide_dir, cmu_slide, tmp_path):
    """The dry run opens every slide's header, probes the output and prints the cost model; a
    missing slide, one without µm/px and an unusable output are each listed, exit 1."""
    from click.testing import CliRunner

    from midnight_prep.cli import main

    good = [slide_dir / "generic40x.tiff", slide_dir / "aperio40x.svs", slide_dir / "scan20x.tiff", cmu_slide]
    standin = tmp_path / "standin.csv"
    standin.write_text("path\n" + "".join(f"{p}\n" for p in good))
    out = tmp_path / "out" / "tcga-dry"
    args = ["plan", str(standin), "-o", str(out), "--total-tiles", "4000", "--slides-per-job", "2", "--dry-run"]
    ok = CliRunner().invoke(main, args)
    assert ok.exit_code == 0, ok.output
    assert "dry run: everything checked is ready" in ok.output and "4,000 asked" in ok.output
    assert "slide scan20x: finest level is 0.5 µm/px, so its 250 tiles at 0.25 µm/px will be skipped" in ok.output
    assert not (tmp_path / "out").exists()  # the probe and the folders made for it are gone

    standin.write_text(standin.read_text() + f"{tmp_path / 'gone.svs'}\n{slide_dir / 'nompp.tiff'}\n")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be")
    bad = CliRunner().invoke(main, ["plan", str(standin), "-o", str(blocked / "x"), "--total-tiles", "4000",
                                    "--dry-run", "--json"])
    assert bad.exit_code == 1, bad.output
    problems = json.loads(bad.output)["problems"]
    assert len(problems) == 3, problems
    assert problems[0].startswith("slide gone: file not found")
    assert problems[1].startswith("slide nompp") and "no usable µm/px" in problems[1]
    assert problems[2].startswith(f"output: cannot write {blocked / 'x'}")


def test_recipe_dry_run_on_object_storage(slide_dir, s3_env, tmp_path):
    import fsspec
    from click.testing import CliRunner

    from midnight_prep.cli import main

    slide = str(slide_dir / "generic40x.tiff")
    fs = fsspec.filesystem("s3")
    fs.put_file(str(slide_dir / "scan20x.tiff"), "midnight/dry-run-slides/a/scan20x.tiff")
    fs.put_file(str(slide_dir / "aperio40x.svs"), "midnight/dry-run-slides/b/aperio40x.svs")
    listed = tmp_path / "remote.csv"
    listed.write_text("path\ns3://midnight/dry-run-slides/a/scan20x.tiff\ns3://midnight/dry-run-slides/b/aperio40x.svs\n"
                      "s3://midnight/dry-run-slides/c/gone.svs\n")
    remote = CliRunner().invoke(main, ["plan", str(listed), "-o", "s3://midnight/dry-run", "--dry-run", "--json"])
    assert remote.exit_code == 1, remote.output
    checked = json.loads(remote.output)
    assert checked["problems"] == ["slide gone: not found: s3://midnight/dry-run-slides/c/gone.svs"]
    assert checked["estimate"]["slide_bytes"] == sum(
        (slide_dir / n).stat().st_size for n in ("scan20x.tiff", "aperio40x.svs"))  # one listing
    assert checked["estimate"]["slides_of_unknown_size"] == 1
    ok = CliRunner().invoke(main, ["plan", slide, "-o", "s3://midnight/dry-run", "--dry-run"])
    assert ok.exit_code == 0, ok.output
    fs.invalidate_cache()
    assert not [p for p in fs.find("midnight/dry-run") if "probe" in p]  # the probe object is deleted
    missing = CliRunner().invoke(main, ["plan", slide, "-o", "s3://no-bucket-for-dry-run/x", "--dry-run"])
    assert missing.exit_code == 1 and "output: cannot write s3://no-bucket-for-dry-run/x" in missing.output
    assert "there is no bucket 'no-bucket-for-dry-run'" in missing.output and "What to do:" in missing.output
    assert not fs.exists("no-bucket-for-dry-run")

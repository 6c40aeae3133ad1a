"""The builder on a real S3 server (SeaweedFS on loopback): locks by conditional PUT, two builders
at once, damaged shards found and redone."""

import re
import subprocess
import sys

import fsspec

CLI = [sys.executable, "-m", "midnight_prep.cli"]
FAST = ["--tiles-per-slide", "4", "--mpp", "1", "--slides-per-job", "1"]


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([*CLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out + err


def test_two_builders_on_object_storage(slide_dir, s3_env):
    out = "s3://midnight/prep-two-builders"
    slides = [slide_dir / n for n in ("generic40x.tiff", "aperio40x.svs", "scan20x.tiff")]
    a, b = start("build", *slides, "-o", out, *FAST), start("build", *slides, "-o", out, *FAST)
    (code_a, text_a), (code_b, text_b) = finish(a), finish(b)
    assert code_a == code_b == 0, text_a + text_b
    ran = [int(re.search(r"from (\d+) jobs", t).group(1)) for t in (text_a, text_b)]
    assert sum(ran) == 3, text_a + text_b
    fs = fsspec.filesystem("s3")
    assert not [p for p in fs.find("midnight/prep-two-builders/locks") if p.endswith(".lock")]

    fs.rm_file("midnight/prep-two-builders/shards/job-000001-0000.tar")
    status = subprocess.run([*CLI, "status", out], capture_output=True, text=True)
    assert status.returncode == 1 and "job-000001: shard shards/job-000001-0000.tar is missing" in status.stdout
    code, text = finish(start("run", out))
    assert code == 0 and "job-000001 is damaged" in text, text
    assert subprocess.run([*CLI, "status", out, "--verify"], capture_output=True).returncode == 0

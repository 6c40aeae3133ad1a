"""`--version` says which PIL is in use: pillow-simd replaces pillow's files in place, pip lists
both, and only the files on disk tell which one a process imports."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
from pathlib import Path

import PIL
from click.testing import CliRunner

from midnight_prep.versions import pil_flavour


def owner_of_imaging_module() -> str:
    """The distribution whose RECORD hash matches PIL's compiled core as it is on disk."""
    core = next(Path(PIL.__file__).parent.glob("_imaging.*so"))
    digest = base64.urlsafe_b64encode(hashlib.sha256(core.read_bytes()).digest()).rstrip(b"=").decode()
    for dist in ("pillow-simd", "pillow"):
        try:
            files = metadata.files(dist) or []
        except metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name == core.name and f.hash is not None and f.hash.value == digest:
                return dist
    return "unknown"


def test_version_names_the_pil_that_imports():
    from midnight_prep.cli import main as prep
    from midnight_train.cli import main as train

    text, simd = pil_flavour()
    assert simd == (owner_of_imaging_module() == "pillow-simd")
    assert PIL.__version__ in text
    for cli in (prep, train):
        result = CliRunner().invoke(cli, ["--version"])
        assert result.exit_code == 0 and f"PIL: {text}" in result.output
    assert "torch" in CliRunner().invoke(train, ["--version"]).output

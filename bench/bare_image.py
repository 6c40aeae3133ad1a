"""Emulate the GPU machine's bare image in this venv: make every installed package that image
lacks unimportable, so that a CPU dry run of ``bench/gpu_check.sh`` meets the same missing
modules as the GPU machine will.

    python bench/bare_image.py DIR    # writes DIR/sitecustomize.py; then PYTHONPATH=DIR ...

The image holds ``IMAGE`` (what the GPU machine is known to have, by the check's contract) and
the wheels ``bench/gpu_check.sh`` carries (``bench/gpu_check_wheels.txt``), each with what it
requires. Every other installed distribution's top-level modules (openslide, openslide_bin,
imagecodecs, tifffile, scikit-image, webdataset, s3fs, ray, ...) raise ModuleNotFoundError on
import, in this process and in every process started with that PYTHONPATH (DataLoader workers,
``accelerate launch``'s processes). The standard library and midnight itself stay importable.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement

HERE = Path(__file__).resolve().parent
# The GPU image's packages as the check relies on them (the real image has more; fewer is safer).
IMAGE = ("torch", "timm", "accelerate", "safetensors", "pillow", "numpy", "fsspec", "click",
         "tqdm", "pyyaml", "scikit-learn")
# Installed here under another name than the image's.
ALIASES = {"pillow": ("pillow", "pillow-simd")}
TOOLS = ("pip", "setuptools", "wheel", "packaging")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_wheels() -> list[str]:
    """Distribution names of the wheels gpu_check.sh carries to the GPU machine."""
    lines = (HERE / "gpu_check_wheels.txt").read_text().splitlines()
    return [re.split(r"[=<>!~ ]", line.strip())[0] for line in lines
            if line.strip() and not line.startswith("#")]


def _installed() -> dict[str, metadata.Distribution]:
    dists: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            dists.setdefault(_norm(name), dist)
    return dists


def allowed_distributions(dists: dict[str, metadata.Distribution]) -> set[str]:
    """IMAGE + carried wheels + their requirements (no extras), as installed here."""
    env = default_environment()
    todo = [alias for name in (*IMAGE, *carried_wheels(), *TOOLS)
            for alias in ALIASES.get(_norm(name), (_norm(name),))]
    allowed: set[str] = set()
    while todo:
        name = todo.pop()
        if name in allowed or name not in dists:
            continue
        allowed.add(name)
        for text in dists[name].requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
                todo.append(_norm(req.name))
    return allowed


def top_level_modules(dist: metadata.Distribution) -> set[str]:
    names = set()
    for file in dist.files or ():
        first = file.parts[0]
        if first in ("..", "__pycache__") or first.endswith((".dist-info", ".egg-info", ".pth")):
            continue
        if len(file.parts) == 1:  # a module file at the top: name.py or name.cpython-*.so
            if not first.endswith((".py", ".so", ".pyd")):
                continue
            first = first.split(".")[0]
        if first.isidentifier():
            names.add(first)
    return names


def blocked_modules(extra: tuple[str, ...] = ()) -> list[str]:
    dists = _installed()
    allowed = allowed_distributions(dists)
    keep = set(sys.stdlib_module_names) | {"midnight_prep", "midnight_train"}
    for name in allowed:
        keep |= top_level_modules(dists[name])
    blocked = set()
    for name, dist in dists.items():
        if name not in allowed:
            blocked |= top_level_modules(dist) - keep
    return sorted(blocked | set(extra))


SITECUSTOMIZE = '''\
"""Written by bench/bare_image.py: modules the GPU machine's image lacks are not found (as if not
installed: ``import`` raises ModuleNotFoundError, ``importlib.util.find_spec`` returns None)."""
import importlib.machinery
import sys

_BLOCKED = frozenset({blocked!r})


class _ImageOnly:
    def __init__(self, inner):
        self._inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            return None
        return self._inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self._inner, attr)


sys.meta_path[:] = [_ImageOnly(f) if f is importlib.machinery.PathFinder else f
                    for f in sys.meta_path]
'''


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="where to write sitecustomize.py")
    parser.add_argument("--block", action="append", default=[],
                        help="also make this top-level module unimportable (tests)")
    args = parser.parse_args()
    out = args.dir
    out.mkdir(parents=True, exist_ok=True)
    blocked = blocked_modules(tuple(args.block))
    (out / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=blocked))
    print(f"bare image: {len(blocked)} top-level modules made unimportable "
          f"({', '.join(m for m in blocked if not m.startswith('_'))[:300]} ...)")


if __name__ == "__main__":
    main()

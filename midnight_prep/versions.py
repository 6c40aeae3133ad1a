"""What is actually installed, for `--version`, run summaries and benchmarks: in particular which
PIL is in use. pillow-simd (5-8x faster resizes) replaces pillow's files in place, so pip lists
both; the PIL that imports is the one whose version matches."""

from __future__ import annotations

import importlib.metadata as metadata

import PIL


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def pil_flavour() -> tuple[str, bool]:
    """(description, is_simd) of the PIL that imports."""
    simd = _installed("pillow-simd")
    if simd is not None and PIL.__version__ == simd:
        return f"pillow-simd {simd} (SIMD resize)", True
    hint = ("; a later pip install replaced pillow-simd, rerun bin/setup" if simd
            else "; bin/setup installs pillow-simd for 5-8x faster resizes")
    return f"pillow {PIL.__version__} (no SIMD{hint})", False


def describe(package: str, extra: tuple[str, ...] = ()) -> str:
    """One line per component that decides speed or results, then `extra` lines."""
    import platform

    import openslide

    return "\n".join([f"{package} {_installed('midnight') or 'unknown'}",
                      f"python {platform.python_version()} on {platform.machine()}",
                      f"PIL: {pil_flavour()[0]}",
                      f"openslide {openslide.__library_version__}, "
                      f"openslide-python {openslide.__version__}", *extra])

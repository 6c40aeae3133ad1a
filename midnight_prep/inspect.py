"""Look at shards: per-shard statistics and a labelled contact sheet."""

from __future__ import annotations

import io
from collections import Counter

import fsspec
from PIL import Image, ImageDraw

from .shards import iter_tiles


def shard_stats(url: str, keep: int = 0) -> tuple[dict, list[tuple[Image.Image, dict]]]:
    per_mpp, slides = Counter(), set()
    fg = hsv = 0.0
    n = 0
    kept = []
    for _key, jpeg, meta in iter_tiles(url):
        n += 1
        per_mpp[f"{meta['mpp']:g}"] += 1
        slides.add(meta["slide_id"])
        fg += meta["foreground"]
        hsv += meta["hsv_fraction"]
        if len(kept) < keep:
            kept.append((Image.open(io.BytesIO(jpeg)).convert("RGB"), meta))
    fs, path = fsspec.core.url_to_fs(url)
    stats = {"samples": n, "bytes": fs.size(path), "per_mpp": dict(per_mpp), "slides": len(slides),
             "foreground": fg / max(n, 1), "hsv_fraction": hsv / max(n, 1)}
    return stats, kept


def contact_sheet(tiles: list[tuple[Image.Image, dict]], path: str, cell: int = 160, columns: int = 8) -> None:
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * cell, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, meta) in enumerate(tiles):
        x, y = (i % columns) * cell, (i // columns) * (cell + 14)
        sheet.paste(img.resize((cell - 4, cell - 4), Image.Resampling.BILINEAR), (x + 2, y + 2))
        draw.text((x + 3, y + cell - 2), f"{meta['mpp']:g} um/px {meta['slide_id'][:14]}", fill="black")
    sheet.save(path)

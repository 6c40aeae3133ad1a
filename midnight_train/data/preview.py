"""What a user looks at before training: `inspect_source` (shard/sample counts, groups, µm/px,
damage), `inspect_slides` for a slide source (online patching: acceptance per slide and µm/px
over a number of draws) and a PNG grid to sanity-check augmentation: per sample, the original
tile, then its two augmented global crops and its local crops, exactly as the training pipeline
produces them (tiles from shards, or drawn from slides by the training stream's sampler)."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from midnight_train.data.config import DataConfig
from midnight_train.data.crops import CropBatch, decode_tile, draw_geometry
from midnight_train.data.records import SkipCounts, shard_records
from midnight_train.data.sources import list_shards, manifest_counts
from midnight_train.method.augment import AugmentConfig, ColorAugment

PAD = 4


def inspect_source(source: str, *, n_samples: int = 200, count_shards: int = 16) -> dict[str, Any]:
    """A summary of a shard source (JSON-serialisable): the shards found; samples per shard from
    the shard builder's manifests when present, else counted by reading up to `count_shards`
    shards; the `group`, `mpp` (µm/px) and `tile_size` values of the first `n_samples` samples'
    JSON, whose JPEGs are also decoded (their pixel sizes count as tile sizes); and what was skipped on the way, by the loader's reasons (plus
    `bad_json` for a sample whose JSON does not parse)."""
    shards = list_shards(source)
    listed = manifest_counts(source) if isinstance(source, str) else None
    counts_skipped = SkipCounts()
    counts: dict[str, int] = {}
    if listed is not None and all(listed.get(u) is not None for u in shards):
        counted_from = "manifests"
        counts = {u: int(listed[u]) for u in shards}  # type: ignore[arg-type]
    else:
        counted_from = "reading"
        for url in shards[:count_shards]:
            counts[url] = sum(1 for _ in shard_records(url, counts_skipped))
    groups: Counter[str] = Counter()
    mpps: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    seen = bad_json = 0
    for url in shards:
        if seen >= n_samples:
            break
        for record in shard_records(url, counts_skipped):
            if seen >= n_samples:
                break
            seen += 1
            try:
                meta = json.loads(record["json"])
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except Exception:
                bad_json += 1
                meta = {}
            groups[str(meta.get("group"))] += 1
            mpps[str(meta.get("mpp"))] += 1
            try:
                width, height = decode_tile(record["jpg"]).size
                sizes[f"{width}x{height}"] += 1
            except Exception as exn:
                counts_skipped.skip("decode_error", f"{url}: {record['__key__']}: {exn!r}")
    per_shard = list(counts.values())
    return {
        "source": source, "shards": len(shards),
        "samples": {"from": counted_from, "shards_counted": len(per_shard), "total": sum(per_shard),
                    "min": min(per_shard, default=0), "max": max(per_shard, default=0),
                    "mean": sum(per_shard) / len(per_shard) if per_shard else 0.0,
                    "per_shard": counts},
        "first_samples": seen, "groups": dict(groups.most_common()),
        "mpp": dict(sorted(mpps.items())), "tile_sizes": dict(sizes.most_common()),
        "skipped": {**counts_skipped.counts, "bad_json": bad_json},
    }


def format_inspection(info: dict[str, Any]) -> str:
    """The human-readable form of `inspect_source`'s (or `inspect_slides`') summary."""
    if info.get("kind") == "slides":
        return format_slide_inspection(info)
    s = info["samples"]
    lines = [f"source: {info['source']}", f"shards: {info['shards']}"]
    if s["shards_counted"]:
        how = "from manifests" if s["from"] == "manifests" else f"counted in {s['shards_counted']} shard(s)"
        lines.append(f"samples per shard ({how}): min {s['min']}, mean {s['mean']:.1f}, max {s['max']}; "
                     f"total {s['total']}")
    n = info["first_samples"]

    def share(counts: dict[str, int]) -> str:
        return ", ".join(f"{k} {v} ({100 * v / max(n, 1):.0f}%)" for k, v in counts.items()) or "-"

    lines.append(f"first {n} samples: groups: {share(info['groups'])}")
    lines.append(f"first {n} samples: µm/px: {share(info['mpp'])}")
    lines.append(f"first {n} samples: tile sizes: {share(info['tile_sizes'])}")
    if len(info["tile_sizes"]) > 1:
        lines.append("warning: tiles of different sizes: crops cover the same fraction of each "
                     "tile, so their fields of view differ; build shards with one --tile-size")
    lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in info["skipped"].items()))
    return "\n".join(lines)


REJECTIONS = ("foreground", "hsv", "read_error")


def _rates(c: dict[str, int]) -> dict[str, Any]:
    """Counts of one group of candidates with their totals and acceptance rates: `candidates`
    are the proposed positions (each accepted or rejected for one reason), `read` those that
    passed the foreground test and were read."""
    candidates = c["accepted"] + sum(c[r] for r in REJECTIONS)
    read = c["accepted"] + c["hsv"] + c["read_error"]
    return {"candidates": candidates, "accepted": c["accepted"], **{r: c[r] for r in REJECTIONS},
            "accept_rate": round(c["accepted"] / candidates, 4) if candidates else None,
            "read_accept_rate": round(c["accepted"] / read, 4) if read else None}


def inspect_slides(data_cfg: DataConfig, *, n_draws: int = 200, seed: int = 0) -> dict[str, Any]:
    """A summary of a slide source (online patching, JSON-serialisable) from `n_draws` tiles
    drawn by one training stream's sampler (`slide_stream.tile_sampler`, with the config's
    slide pool): per µm/px and per slide the candidates proposed, accepted and rejected by
    reason, the µm/px a seen slide cannot give, the slides dropped and why, and the tile sizes."""
    from midnight_prep.job import tile_target
    from midnight_train.data.open_slides import open_slide, slide_cache, slide_datasets
    from midnight_train.data.slide_stream import tile_sampler

    params = data_cfg.tile_params()
    datasets = slide_datasets(data_cfg)
    drawn: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    started = time.perf_counter()
    with tile_sampler(data_cfg, seed=seed) as sampler:
        for _ in range(n_draws):
            tile = sampler.draw()
            drawn[tile.dataset] += 1
            sizes[f"{tile.rgb.shape[1]}x{tile.rgb.shape[0]}"] += 1
        seconds = time.perf_counter() - started
        rows, counters = sampler.acceptance(), dict(sampler.counts)
        dropped = [{"dataset": datasets[d].name, "slide_id": sid,
                    "source": next(x.path for x in datasets[d].slides if x.slide_id == sid),
                    "reason": reason} for (d, sid), reason in sorted(sampler.dropped.items())]
    zero = dict.fromkeys(("accepted", *REJECTIONS), 0)
    by_mpp: dict[float, dict[str, int]] = {}
    by_slide: dict[tuple[str, str], dict[str, int]] = {}
    for row in rows:
        for acc in (by_mpp.setdefault(row["mpp"], dict(zero)),
                    by_slide.setdefault((row["dataset"], row["slide_id"]), dict(zero))):
            for k in acc:
                acc[k] += row[k]
    specs = {(ds.name, x.slide_id): x for ds in datasets for x in ds.slides}
    slides = []
    for (name, sid), c in sorted(by_slide.items()):
        with open_slide(specs[(name, sid)], slide_cache(data_cfg)) as slide:  # levels, µm/px only
            missing = [m for m in params.mpps if tile_target(slide, params, m) is None]
        slides.append({"dataset": name, "slide_id": sid, **_rates(c), "cannot_give_mpp": missing,
                       "per_mpp": {f"{r['mpp']:g}": _rates(r) for r in rows
                                   if (r["dataset"], r["slide_id"]) == (name, sid)}})
    return {
        "kind": "slides", "draws": n_draws, "seed": seed, "seconds": round(seconds, 3),
        "datasets": [{"name": ds.name, "weight": ds.weight, "slides": len(ds.slides),
                      "drawn": drawn.get(ds.name, 0)} for ds in datasets],
        "tiles": {"mpps": list(params.mpps), "tile_size": params.tile_size,
                  "foreground": params.foreground, "hsv_min_fraction": params.hsv_min_fraction,
                  "mpp_tolerance": params.mpp_tolerance},
        "slide_pool": data_cfg.slide_pool, "draws_per_slide": data_cfg.draws_per_slide,
        "per_mpp": {f"{m:g}": _rates(c) for m, c in sorted(by_mpp.items(), reverse=True)},
        "total": _rates({k: sum(c[k] for c in by_mpp.values()) for k in zero}),
        "slides": slides, "dropped": dropped, "counters": counters,
        "tile_sizes": dict(sizes.most_common()),
    }


def format_slide_inspection(info: dict[str, Any]) -> str:
    """The human-readable form of `inspect_slides`' summary."""
    t = info["tiles"]
    lines = [f"slide source: {len(info['datasets'])} dataset(s): " + "; ".join(
        f"{d['name']} ({d['slides']} slides, weight {d['weight']:g}): {d['drawn']} drawn"
        for d in info["datasets"])]
    lines.append(f"tiles: {t['tile_size']} px at {', '.join(f'{m:g}' for m in t['mpps'])} µm/px, "
                 f"foreground ≥ {t['foreground']:g}, HSV ≥ {t['hsv_min_fraction']:g}; "
                 f"slide_pool {info['slide_pool']}, draws_per_slide {info['draws_per_slide']}")
    lines.append(f"{info['draws']} draws in {info['seconds']:.1f} s "
                 f"({info['draws'] / max(info['seconds'], 1e-9):.1f} tiles/s, one process, "
                 f"slide set-up included); tile sizes: "
                 + (", ".join(f"{k} {v}" for k, v in info["tile_sizes"].items()) or "-"))

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    head = (f"{'candidates':>10} {'accepted':>8} {'foreground':>10} {'hsv':>6} {'read_error':>10} "
            f"{'accepted/candidates':>19} {'accepted/read':>13}")

    def cols(r: dict[str, Any]) -> str:
        return (f"{r['candidates']:>10} {r['accepted']:>8} {r['foreground']:>10} {r['hsv']:>6} "
                f"{r['read_error']:>10} {pct(r['accept_rate']):>19} {pct(r['read_accept_rate']):>13}")

    lines += ["", "per µm/px (rejected: foreground = proposed position below the tissue threshold, "
              "hsv = read but failed the HSV filter, read_error = failed read):",
              f"{'µm/px':>6} {head}"]
    lines += [f"{m:>6} {cols(r)}" for m, r in info["per_mpp"].items()]
    lines.append(f"{'all':>6} {cols(info['total'])}")
    many = len(info["datasets"]) > 1
    names = [f"{s['dataset']}/{s['slide_id']}" if many else s["slide_id"] for s in info["slides"]]
    width = max([len(n) for n in names] + [5])
    lines += ["", f"per slide ({len(info['slides'])} seen):",
              f"{'slide':<{width}} {head}  cannot give µm/px"]
    for name, s in zip(names, info["slides"], strict=True):
        lines.append(f"{name:<{width}} {cols(s)}  "
                     + (", ".join(f"{m:g}" for m in s["cannot_give_mpp"]) or "-"))
    lines.append("")
    lines.append(f"slides dropped: {len(info['dropped'])}")
    lines += [f"  {d['dataset']}/{d['slide_id']} ({d['source']}): {d['reason']}" for d in info["dropped"]]
    lines.append("counters: " + ", ".join(f"{k} {v}" for k, v in info["counters"].items()))
    return "\n".join(lines)


def _to_uint8(x: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """Undo normalisation: [n, 3, H, W] float → [n, H, W, 3] uint8."""
    m = torch.tensor(mean)[None, :, None, None]
    s = torch.tensor(std)[None, :, None, None]
    return ((x.cpu() * s + m).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def preview_batch(data_cfg: DataConfig, aug_cfg: AugmentConfig, *, n_samples: int = 4,
                  seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(original tiles, augmented global crops [2, n, G, G, 3], local crops [n_local, n, L, L, 3])
    of the first `n_samples` decodable tiles of a shard source, or of `n_samples` tiles drawn
    from a slide source, cut and augmented by the training pipeline's own functions."""
    batch = CropBatch(n_samples, data_cfg)
    geometry = draw_geometry(np.random.default_rng(seed), n_samples, data_cfg)
    originals: list[np.ndarray] = []
    if data_cfg.source_kind() == "slides":
        from midnight_train.data.slide_stream import tile_sampler

        # The training stream's own draws (stream 0 of 1 with this seed), as SlideStream adds them.
        with tile_sampler(data_cfg, seed=seed) as sampler:
            for row in range(n_samples):
                tile = sampler.draw()
                batch.add(tile.key, Image.fromarray(tile.rgb), geometry, row)
                originals.append(tile.rgb)
        return _augmented(batch, originals, data_cfg, aug_cfg, seed)
    skipped = SkipCounts()
    urls = [u for spec in data_cfg.dataset_specs() for u in list_shards(spec["shards"])]
    for record in (r for url in urls for r in shard_records(url, skipped)):
        try:
            img = decode_tile(record["jpg"])
        except Exception as exn:
            skipped.skip("decode_error", f"{record['__url__']}: {record['__key__']}: {exn!r}")
            continue
        batch.add(record["__key__"], img, geometry, len(originals))
        originals.append(np.asarray(img))
        if batch.full():
            break
    if not batch.full():
        raise ValueError(f"found only {len(originals)} decodable tiles for a preview of "
                         f"{n_samples} (skipped: {skipped.counts})")
    return _augmented(batch, originals, data_cfg, aug_cfg, seed)


def _augmented(batch: CropBatch, originals: list[np.ndarray], data_cfg: DataConfig,
               aug_cfg: AugmentConfig, seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    n_samples = len(originals)
    out = ColorAugment(aug_cfg)(batch.tensors(), torch.Generator().manual_seed(seed))
    mean, std = list(aug_cfg.mean), list(aug_cfg.std)
    g = _to_uint8(out["global_crops"], mean, std)
    g = g.reshape(2, n_samples, *g.shape[1:])
    loc = _to_uint8(out["local_crops"], mean, std)
    loc = loc.reshape(data_cfg.n_local_crops, n_samples, *loc.shape[1:])
    return originals, g, loc


def render_preview(data_cfg: DataConfig, aug_cfg: AugmentConfig, out: str | Path, *,
                   n_samples: int = 4, seed: int = 0) -> Path:
    """Write the grid: one row per sample: original | global 1 | global 2 | locals (2 rows)."""
    originals, g, loc = preview_batch(data_cfg, aug_cfg, n_samples=n_samples, seed=seed)
    gs = g.shape[2]
    n_local = loc.shape[0]
    cell = min(loc.shape[2], (gs - PAD) // 2)  # locals shown at natural size when they fit
    cols = (n_local + 1) // 2
    width = PAD + 3 * (gs + PAD) + cols * (cell + PAD)
    height = PAD + n_samples * (gs + PAD)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for i in range(n_samples):
        y = PAD + i * (gs + PAD)
        canvas.paste(Image.fromarray(np.asarray(originals[i], dtype=np.uint8)).resize((gs, gs), Image.Resampling.LANCZOS), (PAD, y))
        for c in range(2):
            canvas.paste(Image.fromarray(g[c, i]), (PAD + (c + 1) * (gs + PAD), y))
        for k in range(n_local):
            tile = Image.fromarray(loc[k, i]).resize((cell, cell), Image.Resampling.LANCZOS)
            canvas.paste(tile, (PAD + 3 * (gs + PAD) + (k // 2) * (cell + PAD), y + (k % 2) * (cell + PAD)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out

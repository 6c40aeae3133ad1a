"""Summaries of finished jobs: tiles per magnification, rejections by reason, skipped slides,
shortfalls and throughput. Used by `build`, `run` and `status`."""

from __future__ import annotations

from collections import Counter


def summarize(manifests: list[dict]) -> dict:
    written, asked, rejected = Counter(), Counter(), Counter()
    failed, skipped_mpps, shortfalls = [], [], []
    shards = samples = 0
    cpu = 0.0
    for m in manifests:
        shards += len(m["shards"])
        samples += m["samples"]
        cpu += m.get("cpu_seconds", 0.0)
        for s in m["slides"]:
            rejected.update(s["rejected"])
            if s["status"] == "failed":
                failed.append((s["slide_id"], s["source"], s["error"]))
            for mpp, why in s["skipped_mpps"].items():
                skipped_mpps.append((s["slide_id"], mpp, why))
            for mpp, n in s["asked"].items():
                got = s["written"].get(mpp, 0)
                asked[mpp] += n
                written[mpp] += got
                if got < n and s["status"] == "ok" and mpp not in s["skipped_mpps"]:
                    shortfalls.append((s["slide_id"], mpp, got, n, s.get("capped", {}).get(mpp)))
    return {"jobs": len(manifests), "shards": shards, "samples": samples, "written": written,
            "asked": asked, "rejected": rejected, "failed": failed, "skipped_mpps": skipped_mpps,
            "shortfalls": shortfalls, "cpu_seconds": cpu}


def format_summary(summary: dict, wall_seconds: float | None = None, limit: int = 20,
                   brief: bool = False) -> str:
    """``brief`` leaves out the tiles per µm/px and throughput lines (`status` has its own)."""
    lines = [f"{summary['samples']} tiles in {summary['shards']} shards from {summary['jobs']} jobs"]
    mpps = sorted(summary["asked"], key=float, reverse=True)
    if mpps and not brief:
        lines.append("  tiles per µm/px: " + ", ".join(
            f"{m}: {summary['written'][m]}/{summary['asked'][m]}" for m in mpps))
    if summary["rejected"]:
        lines.append("  rejected candidates: " + ", ".join(
            f"{k}: {v}" for k, v in sorted(summary["rejected"].items())))
    if summary["cpu_seconds"] > 0 and not brief:
        lines.append(f"  throughput: {summary['samples'] / summary['cpu_seconds']:.1f} tiles/s per core"
                     + (f", {summary['samples'] / wall_seconds:.1f} tiles/s overall"
                        if wall_seconds else ""))
    for title, rows, fmt in (
        ("failed slides", summary["failed"], lambda r: f"{r[0]} ({r[1]}): {r[2]}"),
        ("magnifications skipped", summary["skipped_mpps"], lambda r: f"{r[0]} @ {r[1]} µm/px: {r[2]}"),
        ("shortfalls (tissue too small or too little passing the filters)", summary["shortfalls"],
         lambda r: f"{r[0]} @ {r[1]} µm/px: {r[2]}/{r[3]}"
                   + (f" (at most {r[4]}: max_coverage x tissue area / tile area)" if r[4] is not None else "")),
    ):
        if rows:
            lines.append(f"  {title} ({len(rows)}):")
            lines += [f"    {fmt(r)}" for r in rows[:limit]]
            if len(rows) > limit:
                lines.append(f"    ... and {len(rows) - limit} more (see the manifests)")
    return "\n".join(lines)

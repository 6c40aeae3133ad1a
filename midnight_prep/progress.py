"""Where a run stands while builders work on it anywhere: jobs and slides done, running, left,
failed and damaged; tiles per µm/px; throughput and a projected finish. Read only from what every
builder leaves on the output: the manifests (finished jobs, with `started_at`, `finished_at` and
`seconds`) and the live lock files (who works on what, their heartbeat age, and the slides and
tiles done so far that the heartbeat carries)."""

from __future__ import annotations

import time

from .jobstate import JobState
from .locks import LockInfo, describe
from .plan import Plan
from .report import summarize

# Lines of running jobs the human output shows (all of them are in --json).
SHOWN = 10


def _busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: the time at least one job was running,
    so a run resumed days later is not charged for the pause."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _asked(job) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in job.slides:
        for mpp, n in s.quotas.items():
            out[mpp] = out.get(mpp, 0) + n
    return out


def run_status(plan: Plan, states: dict[str, JobState], held: dict[str, LockInfo],
               now: float | None = None) -> dict:
    """Everything `status --json` adds to the per-job verdicts (see `format_status`)."""
    now = time.time() if now is None else now
    done = {j: s.manifest for j, s in states.items() if s.kind == "done"}
    running = {j: info for j, info in held.items() if not info.stale and j not in done and j in states}
    kinds = {j: ("running" if j in running else s.kind) for j, s in states.items()}
    summary = summarize(list(done.values()))

    per_mpp = {f"{m:g}": {"asked": 0, "asked_done": 0, "written": 0, "left": 0} for m in plan.params.mpps}
    slides = {"total": len(plan.slides), "done": 0, "failed": len(summary["failed"]), "running": 0,
              "running_done": 0, "left": 0}
    run_rows, intervals, partial = {}, [], 0
    for job in plan.jobs:
        asked = _asked(job)
        for mpp, n in asked.items():
            row = per_mpp.setdefault(mpp, {"asked": 0, "asked_done": 0, "written": 0, "left": 0})
            row["asked"] += n
            row["asked_done" if job.job_id in done else "left"] += n
        if job.job_id in done:
            slides["done"] += len(job.slides)
            m = done[job.job_id]
            if isinstance(m.get("started_at"), (int, float)) and isinstance(m.get("finished_at"), (int, float)):
                intervals.append((m["started_at"], m["finished_at"]))
        elif job.job_id in running:
            info = running[job.job_id]
            got = info.holder.get("progress") or {}
            slides["running"] += len(job.slides)
            slides["running_done"] += int(got.get("slides", 0))
            partial += int(got.get("tiles", 0))
            since = info.holder.get("since")
            if got and isinstance(since, (int, float)):  # only with progress: tiles to match the time
                intervals.append((since, now - info.age_s))
            run_rows[job.job_id] = {
                "host": info.holder.get("host"), "pid": info.holder.get("pid"), "since": since,
                "heartbeat_age_s": round(info.age_s, 1), "slides": len(job.slides),
                "slides_done": got.get("slides"), "tiles_asked": sum(asked.values()),
                "tiles_done": got.get("tiles")}
        else:
            slides["left"] += len(job.slides)
    for m in done.values():
        for s in m["slides"]:
            for mpp, n in s["written"].items():
                per_mpp.setdefault(mpp, {"asked": 0, "asked_done": 0, "written": 0, "left": 0})["written"] += n

    busy = _busy_seconds(intervals)
    timed = [m for m in done.values() if isinstance(m.get("seconds"), (int, float))]
    job_seconds = sum(m["seconds"] for m in timed)
    rate = (summary["samples"] + partial) / busy if busy > 0 and done else None
    tiles_left = max(0, sum(r["left"] for r in per_mpp.values()) - partial)
    eta = tiles_left / rate if rate else (0.0 if tiles_left == 0 else None)
    shard_bytes = sum(int(e["bytes"]) for m in done.values() for e in m["shards"])
    return {
        "counts": {
            "jobs": {k: sum(1 for v in kinds.values() if v == k)
                     for k in ("done", "running", "left", "damaged", "foreign")}
            | {"total": len(plan.jobs),
               "with_failed_slides": sum(1 for s in states.values() if s.kind == "done" and s.failed_slides)},
            "slides": slides,
        },
        "running": run_rows,
        "per_mpp": per_mpp,
        "throughput": {
            "tiles_per_s": round(rate, 2) if rate else None,
            "busy_s": round(busy, 1),
            "tiles_per_s_per_job": round(sum(m["samples"] for m in timed) / job_seconds, 2) if job_seconds else None,
            "tiles_per_cpu_s": round(summary["samples"] / summary["cpu_seconds"], 2) if summary["cpu_seconds"] else None,
            "shard_bytes": shard_bytes,
            "bytes_per_tile": round(shard_bytes / summary["samples"]) if summary["samples"] else None,
        },
        "projection": {"tiles_left": tiles_left, "seconds": round(eta) if eta is not None else None,
                       "finish_at": round(now + eta) if eta is not None else None},
    }


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def size(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000
    return ""


def format_status(st: dict) -> list[str]:
    """A few lines and a table per µm/px: tiles asked, asked of the finished jobs, written by
    them, and asked of the jobs not finished (the verdict line, stale locks, damaged jobs and
    the summary of finished jobs are printed by the caller)."""
    jobs, slides, tp, pr = st["counts"]["jobs"], st["counts"]["slides"], st["throughput"], st["projection"]
    lines = [f"  jobs: {jobs['done']} done ({jobs['with_failed_slides']} with failed slides), "
             f"{jobs['running']} running, {jobs['left']} left, {jobs['damaged']} damaged"
             + (f", {jobs['foreign']} of another plan" if jobs["foreign"] else ""),
             f"  slides: {slides['done']} done ({slides['failed']} failed), {slides['running_done']}/"
             f"{slides['running']} in running jobs, {slides['left']} left"]
    if tp["tiles_per_s"]:
        speed = (f"  throughput: {tp['tiles_per_s']:.1f} tiles/s over {duration(tp['busy_s'])} of building"
                 + (f" ({tp['tiles_per_s_per_job']:.1f} per job, {tp['tiles_per_cpu_s']:.1f} per CPU-second)"
                    if tp["tiles_per_s_per_job"] and tp["tiles_per_cpu_s"] else ""))
    else:
        speed = "  throughput: unknown until a job has finished"
    if pr["seconds"] is None:
        finish = f"{pr['tiles_left']} tiles left, finish unknown"
    elif pr["tiles_left"] == 0:
        finish = "nothing left"
    else:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(pr["finish_at"]))
        finish = (f"{pr['tiles_left']} tiles left: projected finish in {duration(pr['seconds'])} ({when})"
                  + ("" if jobs["running"] else ", once builders run again"))
    lines.append(f"{speed}; {finish}")
    if tp["bytes_per_tile"]:
        lines.append(f"  shards so far: {size(tp['shard_bytes'])}, {tp['bytes_per_tile']} bytes per tile")
    for job_id, r in list(st["running"].items())[:SHOWN]:
        holder = {"host": r["host"], "pid": r["pid"], "since": r["since"]}
        got = ("" if r["tiles_done"] is None else
               f"; {r['slides_done']}/{r['slides']} slides, {r['tiles_done']}/{r['tiles_asked']} tiles")
        lines.append(f"  {job_id}: being built by {describe(holder)} (heartbeat {duration(r['heartbeat_age_s'])} ago{got})")
    if len(st["running"]) > SHOWN:
        lines.append(f"  ... and {len(st['running']) - SHOWN} more running (see --json)")
    lines.append(f"  {'µm/px':>7} {'asked':>12} {'done jobs':>12} {'written':>12} {'left':>12}")
    for mpp, r in sorted(st["per_mpp"].items(), key=lambda kv: -float(kv[0])):
        lines.append(f"  {mpp:>7} {r['asked']:>12} {r['asked_done']:>12} {r['written']:>12} {r['left']:>12}")
    return lines

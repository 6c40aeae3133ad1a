"""What `--executor ray` costs per job against the local process pool, side by side in one run.

One plan of many tiny jobs (one small slide each, a few tiles), built by the local pool and by
the Ray executor (a local Ray instance of as many CPUs, default settings: workers recycled every
10 jobs, and with workers kept) into separate folders, in runs of N and of 2N jobs, interleaved over repeats. Reported:
each executor's cost per job in worker time, as the slope between the two run sizes (so fixed
costs, a pool's start or Ray's connection, are left out), their difference (the Ray overhead per
job, in ms), a job's own work time, Ray's start-up (once per run) and whether both wrote the same
bytes. Usage: python bench/ray_overhead.py [--jobs 30] [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from midnight_prep.executors import run_jobs
from midnight_prep.plan import BuildParams, make_plan
from midnight_prep.ray_executor import RayExecutor
from midnight_prep.samples import cmu_small_region, cmu_tissue, write_pyramid
from midnight_prep.versions import describe


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def timed(executor, plan, jobs, out: Path) -> float:
    started = time.perf_counter()
    outcomes = executor(jobs, plan.params, str(out), plan.sha256())
    wall = time.perf_counter() - started
    failed = [o for o in outcomes.values() if o.error is not None or not o.ran]
    assert not failed, failed[:3]
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=30, help="N: runs of N and of 2N jobs")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import ray

    threads = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    print(describe("midnight-prep", (f"ray {ray.__version__}", f"CPUs {os.cpu_count()}, "
                                     f"workers {args.workers}, threads {threads}")))
    tmp = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    slide = write_pyramid(tmp / "small.tiff", cmu_tissue(cmu_small_region(), 1024, 1024, zoom=1.0),
                          mpp=0.5, downsamples=(1, 4))
    n = args.jobs
    slide_list = tmp / "slides.csv"
    slide_list.write_text("path,slide_id\n" + "".join(f"{slide},s{i:04d}\n" for i in range(2 * n)))
    # One slide per job, 8 tiles of 256 px at 1 µm/px: a job of a few tens of ms of work.
    plan = make_plan([str(slide_list)], str(tmp / "x"), BuildParams(mpps=(1.0,), shard_size=8),
                     tiles_per_slide=8, slides_per_job=1)
    assert len(plan.jobs) == 2 * n

    def local(*a):
        return run_jobs(*a, workers=args.workers)

    recycled = RayExecutor(num_cpus=args.workers)  # the default: a new worker every 10 jobs
    kept = RayExecutor(num_cpus=args.workers, jobs_per_worker=10**6)  # the same instance, no recycling
    started = time.perf_counter()
    recycled.connect()
    ray_start = time.perf_counter() - started
    executors = {"local": local, "ray": recycled, "ray, workers kept": kept}
    walls: dict[tuple[str, int], list[float]] = {}
    try:
        timed(recycled, plan, plan.jobs[:n], tmp / "warm")  # Ray starts its worker processes
        for r in range(args.repeats):
            for size in (n, 2 * n):
                for i, (name, executor) in enumerate(executors.items()):
                    walls.setdefault((name, size), []).append(
                        timed(executor, plan, plan.jobs[:size], tmp / f"{i}-{size}-{r}"))
    finally:
        kept.close()
        recycled.close()
    first = digests(tmp / f"0-{2 * n}-0")
    same = bool(first) and all(digests(tmp / f"{i}-{2 * n}-0") == first for i in (1, 2))
    work = statistics.mean(json.loads(p.read_text())["seconds"]
                           for p in (tmp / f"0-{2 * n}-0" / "manifests").glob("*.json"))
    print(f"\nruns of {n} and {2 * n} jobs, {args.repeats} repeats, {args.workers} workers; a job's "
          f"own work: {work * 1000:.0f} ms (mean, from the manifests)")
    per_job = {}
    for name in executors:
        t1, t2 = (statistics.median(walls[(name, size)]) for size in (n, 2 * n))
        # The slope leaves out fixed costs (a pool's start, Ray's connection) and keeps per-job
        # ones (scheduling, result transfer, Ray's worker recycling).
        per_job[name] = (t2 - t1) / n * args.workers * 1000
        print(f"  {name:17s}: {t1:6.2f} s for {n} jobs, {t2:6.2f} s for {2 * n} (medians); "
              f"{per_job[name]:6.1f} ms of a worker per job"
              + (f", overhead {per_job[name] - per_job['local']:+.1f} ms" if name != "local" else ""))
    print(f"  Ray start-up (local instance, once per run): {ray_start:.1f} s")
    print(f"  same shards (sha256) local vs ray: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()

"""Run a plan's jobs: in this process, or in a local process pool. Other engines (SLURM arrays,
Ray) run `midnight-prep run PLAN --task I --num-tasks N`, each task a disjoint slice of the jobs;
a job's manifest is its commit marker, so any engine may retry any job."""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from .job import run_job
from .plan import BuildParams, JobSpec

_progress_queue = None


def _init_worker(q) -> None:
    global _progress_queue
    _progress_queue = q


def _report(kind: str, n: int) -> None:
    _progress_queue.put((kind, n))


def _run_in_worker(job: JobSpec, params: BuildParams, output: str, plan_sha256: str) -> dict:
    return run_job(job, params, output, plan_sha256, progress=_report)


def run_jobs(jobs: list[JobSpec], params: BuildParams, output: str, plan_sha256: str, workers: int = 1,
             progress: Callable[[str, int], None] | None = None,
             on_done: Callable[[str, dict | None, BaseException | None], None] | None = None,
             ) -> dict[str, dict | BaseException]:
    """Run ``jobs``; return job_id -> manifest, or the exception that stopped that job (an
    unreachable object store, say). One failed job never stops the others. Jobs are independent,
    so results do not depend on ``workers``."""
    results: dict[str, dict | BaseException] = {}

    def finish(job_id: str, result) -> None:
        results[job_id] = result
        if on_done:
            ok = not isinstance(result, BaseException)
            on_done(job_id, result if ok else None, None if ok else result)

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            try:
                finish(job.job_id, run_job(job, params, output, plan_sha256, progress=progress))
            except Exception as e:
                finish(job.job_id, e)
        return results
    # spawn, not fork: OpenSlide and decoder state must be created inside each worker.
    ctx = mp.get_context("spawn")
    q = ctx.Manager().Queue()
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(q,)) as pool:
        pending = {pool.submit(_run_in_worker, job, params, output, plan_sha256): job for job in jobs}
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(q, progress)
            for fut in done:
                job = pending.pop(fut)
                finish(job.job_id, fut.exception() or fut.result())
        _drain(q, progress)
    return results


def _drain(q, progress) -> None:
    while True:
        try:
            kind, n = q.get_nowait()
        except queue.Empty:
            return
        if progress:
            progress(kind, n)

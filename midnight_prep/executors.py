"""Run a plan's jobs: in this process, or in a local process pool (`ray_executor`: as Ray tasks,
through the same `build_job`). Other engines (SLURM arrays, Kubernetes jobs) run `midnight-prep
run PLAN --task I --num-tasks N`, each task a disjoint slice of the jobs;
a job's manifest is its commit marker, so any engine may retry any job. Each job runs under its
lock (`locks`): a builder that finds a job locked by another live one leaves it to that one."""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass

from . import locks, shards, storage
from .job import clean_stale_scratch, run_job
from .jobstate import check_jobs
from .plan import BuildParams, JobSpec

_progress_queue = None


@dataclass
class Outcome:
    job_id: str
    manifest: dict | None = None  # the job is done: by this call (ran) or by another builder
    ran: bool = False
    holder: dict | None = None  # another live builder holds the job's lock
    error: BaseException | None = None


def build_job(job: JobSpec, params: BuildParams, output: str, plan_sha256: str, redo: bool = False,
              progress: Callable[[str, int], None] | None = None) -> Outcome:
    """Run ``job`` holding its lock. Without ``redo``, a job that another builder finished
    meanwhile is not run again; with it (a damaged job), it is."""
    lock = locks.acquire(locks.lock_url(output, job.job_id), job.job_id)
    if not isinstance(lock, locks.Lock):
        return Outcome(job.job_id, holder=lock)
    try:
        if not redo:
            state = shards.retried(lambda: check_jobs(output, plan_sha256, [job.job_id])[job.job_id],
                                   output, "read")
            if state.kind == "done":
                return Outcome(job.job_id, state.manifest)
            if state.kind == "foreign":
                raise RuntimeError(f"{shards.manifest_name(job.job_id)} {state.why} (written while "
                                   "this build ran); check who else writes to this output")
        shards.remove_partials(output, job.job_id)
        return Outcome(job.job_id, run_job(job, params, output, plan_sha256, lock.counting(progress)),
                       ran=True)
    finally:
        lock.release()


def _exit(signum, frame) -> None:
    sys.exit(128 + signum)


@contextmanager
def sigterm_exits():
    """While inside, SIGTERM (a cluster's time limit, `kill`, preemption) raises SystemExit, so
    that scratch directories are removed and locks released on the way out."""
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _init_worker(q, storage_conf: dict) -> None:
    global _progress_queue
    _progress_queue = q
    storage.apply_worker_config(storage_conf)  # --storage-options: spawned workers start without them
    signal.signal(signal.SIGTERM, _exit)


def _report(kind: str, n: int) -> None:
    _progress_queue.put((kind, n))


def _build_in_worker(job: JobSpec, params: BuildParams, output: str, plan_sha256: str,
                     redo: bool) -> Outcome:
    return build_job(job, params, output, plan_sha256, redo, progress=_report)


def run_jobs(jobs: list[JobSpec], params: BuildParams, output: str, plan_sha256: str, workers: int = 1,
             progress: Callable[[str, int], None] | None = None,
             on_done: Callable[[Outcome], None] | None = None,
             redo: frozenset[str] | set[str] = frozenset(),
             ) -> dict[str, Outcome]:
    """Run ``jobs`` (those in ``redo`` even if they look done); return job_id -> Outcome. One
    failed job never stops the others: its Outcome holds the exception (an unreachable object
    store, say). Jobs are independent, so results do not depend on ``workers``."""
    results: dict[str, Outcome] = {}
    clean_stale_scratch()

    def finish(outcome: Outcome) -> None:
        results[outcome.job_id] = outcome
        if on_done:
            on_done(outcome)

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            try:
                finish(build_job(job, params, output, plan_sha256, job.job_id in redo, progress))
            except Exception as e:
                finish(Outcome(job.job_id, error=e))
        return results
    # spawn, not fork: OpenSlide and decoder state must be created inside each worker.
    ctx = mp.get_context("spawn")
    q = ctx.Manager().Queue()
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(q, storage.worker_config())) as pool:
        pending = {pool.submit(_build_in_worker, job, params, output, plan_sha256, job.job_id in redo): job
                   for job in jobs}
        try:
            while pending:
                done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(q, progress)
                for fut in done:
                    job = pending.pop(fut)
                    error = fut.exception()
                    finish(Outcome(job.job_id, error=error) if error else fut.result())
        except BaseException:  # SIGTERM or Ctrl-C: stop the workers, each cleaning up its job
            pool.shutdown(wait=False, cancel_futures=True)
            for child in mp.active_children():
                child.terminate()
            raise
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

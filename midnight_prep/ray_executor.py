"""Run a plan's jobs on Ray (`--executor ray`): one Ray task per job, each calling the same
`executors.build_job` as the local pool, so locks, resume and the commit protocol are the same
and so are the bytes. Only small things travel: the job spec in, the manifest (an `Outcome`) out,
and progress counts through a small actor. Importing this module does not import Ray; using it
without Ray installed is a one-line error.

A task whose worker dies (killed, out of memory, node lost) is retried by Ray; one that raises a
transient storage error (`storage.is_transient`) is retried too; any other error ends the job as
failed at once, with its message. Workers are recycled after `jobs_per_worker` jobs (Ray's
``max_calls``), which bounds what a long-lived worker process can accumulate. Ctrl-C or SIGTERM
cancels the outstanding tasks: running ones get a KeyboardInterrupt, so each releases its lock
and removes its scratch files on the way out."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable

from . import staging
from .executors import Outcome, build_job
from .job import clean_stale_scratch
from .plan import BuildParams, JobSpec
from .storage import apply_worker_config, is_transient, worker_config

INSTALL_HINT = "the Ray executor needs Ray: pip install 'midnight[ray]'"
# A local instance (no --ray-address) only carries job specs and manifests: a small object store.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
# How often a task sends its progress counts, and how long running tasks get to stop on Ctrl-C.
PROGRESS_EVERY_S = 0.5
CANCEL_GRACE_S = 15.0
# How long the first look at --ray-address may take: Ray itself waits for minutes on an address
# where nothing listens, printing only its own warnings.
REACH_TIMEOUT_S = 5.0


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster at --ray-address cannot be joined."""


class TransientJobError(RuntimeError):
    """A job failed with an error worth another try (Ray retries the task on it)."""


def check_installed() -> None:
    """RayUnavailable with the install hint when Ray is not installed (without importing it)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise RayUnavailable(INSTALL_HINT)


def check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """RayUnavailable naming ``address`` ("HOST:PORT" or "ray://HOST:PORT") when nothing
    accepts a connection there within ``timeout_s``; "auto", "local" and addresses without a
    port are left to Ray."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayUnavailable(
            f"cannot join the Ray cluster at {address}: nothing answers there ({e}). Check "
            "that `ray start --head` runs there and that --ray-address (HOST:PORT of its GCS, "
            "port 6379 by default) is right") from None


def _ray():
    try:
        import ray
    except ImportError as e:
        raise RayUnavailable(INSTALL_HINT) from e
    return ray


class _Progress:
    """The actor collecting progress counts from tasks: (job_id, attempt, {kind: n}) events."""

    def __init__(self):
        self.events: list[tuple[str, str, dict[str, int]]] = []

    def add(self, job_id: str, attempt: str, counts: dict[str, int]) -> None:
        self.events.append((job_id, attempt, counts))

    def take(self) -> list[tuple[str, str, dict[str, int]]]:
        events, self.events = self.events, []
        return events


class _Reporter:
    """A job's progress callback inside a task: counts, sent to the actor at most every
    PROGRESS_EVERY_S (a call per tile would flood it)."""

    def __init__(self, actor, job_id: str):
        self.actor, self.job_id, self.attempt = actor, job_id, uuid.uuid4().hex
        self.counts: dict[str, int] = {}
        self.sent = time.monotonic()

    def __call__(self, kind: str, n: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        if time.monotonic() - self.sent > PROGRESS_EVERY_S:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        if self.counts:
            ref = self.actor.add.remote(self.job_id, self.attempt, self.counts)
            if wait:  # the last counts are in before the task's result is
                _ray().get(ref)
            self.counts = {}
        self.sent = time.monotonic()


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (to travel to the driver), else its type and message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def _build_task(job: JobSpec, params: BuildParams, output: str, plan_sha256: str, redo: bool,
                progress_actor, storage_conf: dict, env: dict[str, str]) -> Outcome:
    """One job in a Ray worker (any node): the same `build_job` as the local pool."""
    apply_worker_config(storage_conf)  # --storage-options of the driver (kept in memory only)
    os.environ.update(env)  # --stage-dir / --stage-max-gb
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and \
            threading.current_thread() is threading.main_thread():
        # Ray cancels a running task by interrupting it, which does nothing where SIGINT is
        # ignored (workers of a `ray start` run from a script in the background inherit that).
        signal.signal(signal.SIGINT, signal.default_int_handler)
    clean_stale_scratch()  # a worker killed on this node earlier may have left some
    report = _Reporter(progress_actor, job.job_id)
    try:
        return build_job(job, params, output, plan_sha256, redo, report)
    except Exception as e:
        if is_transient(e):
            raise TransientJobError(f"{type(e).__name__}: {e}") from None
        return Outcome(job.job_id, error=_portable(e))
    finally:
        try:
            report.flush()
        except Exception:  # the driver is gone: nobody to tell
            pass


class RayExecutor:
    """``executor(jobs, params, output, plan_sha256, progress, on_done, redo)`` like
    `executors.run_jobs`, on Ray. Joins ``address`` (a `ray start` cluster, "auto" for the
    one this node belongs to) or starts a local instance of ``num_cpus`` CPUs on first use;
    `close` leaves it."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None,
                 max_retries: int = 3, jobs_per_worker: int = 10):
        self.address, self.num_cpus = address, num_cpus
        self.max_retries, self.jobs_per_worker = max_retries, jobs_per_worker
        self._ray = None
        self._started = False  # this executor connected (so it disconnects in close)
        self._actor = None
        self._task = None
        self._attempts: dict[str, tuple[str, dict[str, int]]] = {}

    def connect(self):
        """Join the cluster (or start the local instance) now; `__call__` does it when needed."""
        if self._ray is not None:
            return self._ray
        ray = _ray()
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            if self.address:
                check_reachable(self.address)
            try:
                if self.address:
                    ray.init(address=self.address, logging_level=logging.WARNING)
                else:
                    # A throw-away instance for this run: Ray's note that it enabled token
                    # authentication (its default) is not news for the user.
                    logging.getLogger("ray._private.authentication.authentication_token_setup") \
                        .setLevel(logging.ERROR)
                    ray.init(num_cpus=self.num_cpus, include_dashboard=False,
                             object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                             logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise RayUnavailable(
                    f"cannot join {where}: {e}. Check that `ray start --head` runs there, that "
                    "--ray-address is right and, for a cluster with token authentication, that "
                    "RAY_AUTH_MODE=token is set and the token is in ~/.ray/auth_token or "
                    "RAY_AUTH_TOKEN") from e
            self._started = True
        self._actor = ray.remote(num_cpus=0)(_Progress).remote()
        self._task = ray.remote(num_cpus=1, max_retries=self.max_retries,
                                retry_exceptions=[TransientJobError],
                                max_calls=self.jobs_per_worker)(_build_task)
        self._ray = ray
        return ray

    def describe(self) -> str:
        if self._ray is None:
            return "Ray"
        cpus = int(self._ray.cluster_resources().get("CPU", 0))
        return f"Ray ({cpus} CPUs, {len(self._ray.nodes())} node(s))"

    def __call__(self, jobs: list[JobSpec], params: BuildParams, output: str, plan_sha256: str,
                 progress: Callable[[str, int], None] | None = None,
                 on_done: Callable[[Outcome], None] | None = None,
                 redo: frozenset[str] | set[str] = frozenset()) -> dict[str, Outcome]:
        results: dict[str, Outcome] = {}
        if not jobs:
            return results
        ray = self.connect()
        conf = ray.put(worker_config())
        env = {k: os.environ[k] for k in (staging.ENV_DIR, staging.ENV_MAX_GB) if k in os.environ}
        pending = {self._task.remote(job, params, output, plan_sha256, job.job_id in redo,
                                     self._actor, conf, env): job for job in jobs}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0.2,
                                    fetch_local=False)
                self._drain(progress)
                for ref in ready:
                    outcome = self._outcome(ref, pending.pop(ref))
                    results[outcome.job_id] = outcome
                    if on_done:
                        on_done(outcome)
        except BaseException:  # Ctrl-C or SIGTERM: stop every task, each releasing its lock
            self._cancel(list(pending))
            raise
        self._drain(progress)
        return results

    def _outcome(self, ref, job: JobSpec) -> Outcome:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, TransientJobError):
                return Outcome(job.job_id, error=RuntimeError(
                    f"{cause} (failed {self.max_retries + 1} times)"))
            return Outcome(job.job_id, error=cause if isinstance(cause, Exception) else e)
        except ray.exceptions.RayError as e:  # its worker died every time it was tried
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return Outcome(job.job_id, error=RuntimeError(
                f"its Ray worker died {self.max_retries + 1} times ({type(e).__name__}: {first})"))

    def _drain(self, progress: Callable[[str, int], None] | None) -> None:
        """Pass the tasks' progress counts on; a retried job's earlier counts are taken back."""
        for job_id, attempt, counts in self._ray.get(self._actor.take.remote()):
            previous, total = self._attempts.get(job_id, (attempt, {}))
            if previous != attempt:  # a new try of this job: it starts again from zero
                for kind, n in total.items():
                    if progress and n:
                        progress(kind, -n)
                total = {}
            for kind, n in counts.items():
                total[kind] = total.get(kind, 0) + n
                if progress:
                    progress(kind, n)
            self._attempts[job_id] = (attempt, total)

    def _cancel(self, refs: list) -> None:
        """Cancel the tasks of ``refs`` that have not finished: running ones get a
        KeyboardInterrupt (their `finally` releases the lock); those still running after
        CANCEL_GRACE_S are killed with their worker."""
        ray = self._ray
        try:
            for force, grace in ((False, CANCEL_GRACE_S), (True, 0.0)):
                _, running = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
                for ref in running:
                    try:
                        ray.cancel(ref, force=force)
                    except Exception:  # finished meanwhile
                        pass
                if running and grace:
                    ray.wait(running, num_returns=len(running), timeout=grace, fetch_local=False)
        except BaseException:  # a second Ctrl-C: stop waiting, leave the rest to `close`
            pass

    def close(self) -> None:
        if self._ray is not None and self._started:
            self._ray.shutdown()
        self._ray = self._actor = self._task = None
        self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

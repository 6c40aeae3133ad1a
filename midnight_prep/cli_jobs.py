"""What `midnight-prep`'s commands do with plans and jobs: make, store and load a plan, select a
task's jobs, run them on an executor with progress bars (waiting for jobs other builders hold),
print the summary and decide the exit status."""

from __future__ import annotations

import functools
import sys
import time
from contextlib import contextmanager

import click
from tqdm import tqdm

from . import locks, shards, staging, storage
from .executors import run_jobs, sigterm_exits
from .jobstate import JobState, check_jobs, foreign_message, other_manifests
from .plan import BuildParams, Plan, PlanError, make_plan
from .report import format_summary, summarize


def plan_from_options(inputs, output, mpps, tile_size, tiles_per_slide, total_tiles, shard_size,
                       seed, foreground, hsv_min_fraction, slides_per_job, group) -> Plan:
    if tiles_per_slide is None and total_tiles is None:
        tiles_per_slide = 1000
    try:
        params = BuildParams(mpps=mpps, tile_size=tile_size, seed=seed, foreground=foreground,
                             hsv_min_fraction=hsv_min_fraction, shard_size=shard_size)
        return make_plan(list(inputs), output, params, tiles_per_slide, total_tiles, slides_per_job, group)
    except PlanError as e:
        raise click.UsageError(str(e)) from e


def store_plan(plan: Plan) -> str:
    """Write plan.json next to the shards (an exclusive create: of two builders starting at once
    one writes it, the other compares); refuse to mix two different plans in one output."""
    url = shards.join(plan.output, shards.PLAN_NAME)
    try:
        if not shards.exists(url):
            _job_states(plan, plan.jobs, whole_output=True)  # no plan.json, but maybe another plan's results
            try:
                shards.create_new(plan.to_json().encode(), url)
            except FileExistsError:
                pass  # another builder was first: compare with its plan
        if Plan.from_dict(shards.read_json(url)).sha256() != plan.sha256():
            raise click.UsageError(
                f"{url} holds a different plan (other slides or options). Use a new --output, or "
                f"continue that plan with: midnight-prep run {url}")
    except OSError as e:
        raise click.ClickException(f"cannot write to {plan.output}: {e}. Check the path or the object store.") from e
    except (ValueError, KeyError, TypeError, PlanError) as e:
        raise click.ClickException(f"cannot read the plan {url}: {e}") from e
    return url


def _job_states(plan: Plan, jobs, whole_output: bool = False, verify: bool = False,
                ) -> dict[str, JobState]:
    """The state of ``jobs``; refuses (exit 2) when the output holds results of another plan
    (with ``whole_output``, also manifests of jobs this plan does not have)."""
    try:
        states = check_jobs(plan.output, plan.sha256(), [j.job_id for j in jobs], verify)
        others = other_manifests(plan.output, {j.job_id for j in plan.jobs}) if whole_output else []
    except OSError as e:
        raise click.ClickException(f"cannot read {plan.output}: {e}") from e
    foreign = [s for s in states.values() if s.kind == "foreign"]
    if foreign or others:
        raise click.UsageError(foreign_message(plan.output, foreign, others))
    return states


def plan_folder(source: str) -> str:
    return shards.folder_of(source) if source.endswith(".json") else source


def load_plan(source: str) -> Plan:
    """The plan at ``source`` (plan.json or its folder), working on the folder it was read from."""
    url = source if source.endswith(".json") else shards.join(source, shards.PLAN_NAME)
    try:
        plan = Plan.from_dict(shards.read_json(url))
    except FileNotFoundError as e:
        raise click.UsageError(f"no plan at {url}; create one with `midnight-prep plan`") from e
    except (OSError, ValueError, KeyError, TypeError, PlanError) as e:
        raise click.ClickException(f"cannot read the plan {url}: {e}") from e
    here = shards.folder_of(url)
    if shards.canonical(plan.output) != here:
        click.echo(f"note: {url} was made for the output {plan.output}; it is now in {here}, so "
                   f"{here} is used (the plan's own folder)", err=True)
        plan.output = here
    return plan


def select_jobs(plan: Plan, task: int, num_tasks: int, job_ids: str | None):
    jobs = plan.jobs
    if job_ids:
        wanted = {j.strip() for j in job_ids.split(",") if j.strip()}
        unknown = wanted - {j.job_id for j in jobs}
        if unknown:
            raise click.UsageError(f"unknown job ids: {', '.join(sorted(unknown))}")
        jobs = [j for j in jobs if j.job_id in wanted]
    if not 0 <= task < num_tasks:
        raise click.UsageError(f"--task must be in [0, {num_tasks})")
    return [j for i, j in enumerate(jobs) if i % num_tasks == task]


def use_storage(url: str, options: dict | None) -> None:
    """Apply --storage-options for ``url`` and look at it once (seconds, not the retry budget):
    a server that is down, refused credentials or a missing bucket end the command here."""
    storage.configure(url, options)
    storage.probe(url)


# How often a builder looks again at jobs that another builder is working on.
WAIT_S = 2.0


def execute(plan: Plan, jobs, workers: int, verify: bool, retry_failed: bool,
             whole_output: bool = False, executor=None, where: str = "") -> int:
    """Run the jobs of ``jobs`` that are not done yet (damaged ones included, and with
    ``retry_failed`` those with failed slides) with ``executor`` (default: a local pool of
    ``workers``; ``where`` says what it is); print a summary; return the exit status."""
    states = _job_states(plan, jobs, whole_output, verify)
    redo = set()
    for s in states.values():
        if s.kind == "damaged":
            click.echo(f"{s.job_id} is damaged: {s.why}; redoing it", err=True)
            redo.add(s.job_id)
        elif s.kind == "done" and retry_failed and s.failed_slides:
            click.echo(f"{s.job_id}: retrying its {len(s.failed_slides)} failed slide(s)", err=True)
            redo.add(s.job_id)
    done = {job_id: s.manifest for job_id, s in states.items() if s.kind == "done" and job_id not in redo}
    pending = [j for j in jobs if j.job_id not in done]
    click.echo(f"{len(jobs) - len(pending)} of {len(jobs)} jobs already done; running {len(pending)} "
               f"{where or f'with {workers} worker(s)'} -> {plan.output}", err=True)
    if any(not shards.is_local(s.path) for j in pending for s in j.slides):
        click.echo(f"remote slides are staged (copied for OpenSlide) in {staging.default_root()}, "
                   "each removed after its job; --stage-dir / --stage-max-gb to change",
                   err=True)
    started = time.time()
    executor = executor or functools.partial(run_jobs, workers=workers)
    with sigterm_exits():
        ran, failed_jobs = _run_with_progress(plan, pending, executor, redo, done)
    if ran or not done:
        click.echo(format_summary(summarize(ran), wall_seconds=time.time() - started if ran else None))
    else:  # a rerun of a finished output: what is there, not "0 tiles in 0 shards from 0 jobs"
        lines = format_summary(summarize(list(done.values())), brief=True).split("\n")
        lines[0] = f"{len(done)} of {len(jobs)} jobs already done ({lines[0]}); nothing left to run"
        click.echo("\n".join(lines))
    for job_id, error in failed_jobs:
        click.echo(f"  job {job_id} did not finish ({type(error).__name__}: {error}); "
                   "run the same command again to retry it", err=True)
    return _verdict(jobs, done, ran, bool(failed_jobs))


class _Bars:
    """Progress bars of slides and tiles; tiles asked for but not written (shortfalls, skipped
    magnifications, jobs finished elsewhere) shrink the tiles total, so the bar can end full."""

    def __init__(self, jobs):
        self.quota = {j.job_id: sum(sum(s.quotas.values()) for s in j.slides) for j in jobs}
        self.slides = tqdm(total=sum(len(j.slides) for j in jobs), desc="slides", unit="slide",
                           position=0, disable=None, leave=True)
        self.tiles = tqdm(total=sum(self.quota.values()), desc="tiles ", unit="tile", position=1,
                          disable=None, leave=True, smoothing=0.05)

    def __call__(self, kind: str, n: int) -> None:
        if kind == "unfilled":
            self.tiles.total -= n
            self.tiles.refresh()
        else:
            (self.slides if kind == "slides" else self.tiles).update(n)

    def done_elsewhere(self, job_id: str, manifest: dict) -> None:
        self("slides", len(manifest["slides"]))
        self("unfilled", self.quota[job_id])

    def close(self) -> None:
        self.slides.close()
        self.tiles.close()


def _run_with_progress(plan: Plan, pending, executor, redo: set[str], done: dict):
    """Run ``pending`` with ``executor`` (`run_jobs`'s arguments) and progress bars; jobs another builder is working on are left to it and
    waited for at the end. Adds finished jobs to ``done``; returns (manifests of the jobs run
    here, [(job_id, exception)] of those that failed)."""
    bars = _Bars(pending)
    failed_jobs, ran = [], []

    def on_done(outcome) -> None:
        if outcome.error is not None:
            failed_jobs.append((outcome.job_id, outcome.error))
            tqdm.write(f"job {outcome.job_id} failed: {outcome.error}", file=sys.stderr)
        elif outcome.manifest is not None:
            done[outcome.job_id] = outcome.manifest
            if outcome.ran:
                ran.append(outcome.manifest)
            else:
                tqdm.write(f"{outcome.job_id} was finished by another builder", file=sys.stderr)
                bars.done_elsewhere(outcome.job_id, outcome.manifest)

    todo, told = pending, set()
    try:
        while todo:
            outcomes = executor(todo, plan.params, plan.output, plan.sha256(), progress=bars,
                                on_done=on_done, redo=redo)
            busy = [j for j in todo if outcomes[j.job_id].holder is not None]
            for job in busy:
                if job.job_id not in told:
                    told.add(job.job_id)
                    tqdm.write(f"{job.job_id} is being built by "
                               f"{locks.describe(outcomes[job.job_id].holder)}; waiting for it",
                               file=sys.stderr)
            todo = _wait_for_a_free_lock(plan, busy)
    finally:
        bars.close()
    return ran, failed_jobs


def _wait_for_a_free_lock(plan: Plan, busy: list) -> list:
    """The jobs of ``busy`` whose lock is free again (released, or its owner died), waiting
    until there is one; [] when ``busy`` is empty."""
    while busy:
        time.sleep(WAIT_S)
        free = [j for j in busy if locks.live_holder(locks.lock_url(plan.output, j.job_id)) is None]
        if free:
            return free
    return []


def _verdict(jobs, done: dict, ran: list[dict], jobs_failed: bool) -> int:
    """Exit status of the selection: 1 while a job did not finish, any of its slides failed
    (in this run or an earlier one), or it wrote no tile at all."""
    finished = [done[j.job_id] for j in jobs if j.job_id in done]
    failed = [s for m in finished for s in m["slides"] if s["status"] == "failed"]
    ran_ids = {m["job_id"] for m in ran}
    earlier = [s for m in finished if m["job_id"] not in ran_ids for s in m["slides"]
               if s["status"] == "failed"]
    if earlier:
        click.echo(f"  {len(earlier)} slide(s) failed in an earlier run (first: {earlier[0]['slide_id']}: "
                   f"{earlier[0]['error']}); fix them, then run again with --retry-failed to redo "
                   "their jobs", err=True)
    asked = sum(sum(s.quotas.values()) for j in jobs for s in j.slides)
    empty = len(finished) == len(jobs) and asked > 0 and sum(m["samples"] for m in finished) == 0
    if empty:
        click.echo(f"  no tiles were written ({asked} asked): every candidate was rejected (see the "
                   "counts above). Check the slides, --foreground and --hsv-min-fraction", err=True)
    return 1 if jobs_failed or failed or empty else 0


@contextmanager
def executor_for(executor: str, workers: int, ray_address: str | None, ray_jobs_per_worker: int,
              ray_retries: int):
    """(executor for `execute`, what it is for messages); a Ray connection is closed after."""
    if executor == "local":
        if ray_address:
            raise click.UsageError("--ray-address needs --executor ray")
        yield None, f"with {workers} worker(s)"
        return
    from .ray_executor import RayExecutor, RayUnavailable, check_installed, check_reachable

    try:
        check_installed()
        if ray_address:  # before any planning: an address where nothing answers, in seconds
            check_reachable(ray_address)
        with RayExecutor(ray_address, None if ray_address else workers, ray_retries,
                         ray_jobs_per_worker) as ray_executor:
            yield ray_executor, (f"on the Ray cluster at {ray_address}" if ray_address else
                                 f"on a local Ray instance of {workers} CPU(s)")
    except RayUnavailable as e:
        raise click.ClickException(str(e)) from e

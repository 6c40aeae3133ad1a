"""`midnight-prep`: whole-slide images -> filtered multi-magnification webdataset shards."""

from __future__ import annotations

import functools
import json
import sys
import time
from contextlib import contextmanager

import click
from tqdm import tqdm

from . import locks, shards, storage
from .estimate import DEFAULT_CORES_PER_NODE, DEFAULT_NODES
from .executors import run_jobs, sigterm_exits
from .jobstate import JobState, check_jobs, foreign_message, other_manifests
from .plan import BuildParams, Plan, PlanError, make_plan
from .progress import format_status, run_status
from .report import format_summary, summarize


def _mpp_list(ctx, param, value: str) -> tuple[float, ...]:
    """Parse only; BuildParams says which values are allowed."""
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers like 2,1,0.5,0.25") from e


def plan_options(f):
    opts = [
        click.argument("inputs", nargs=-1, required=True),
        click.option("--output", "-o", required=True,
                     help="Where shards, manifests and plan.json go: a local path or an fsspec URL (s3://bucket/prefix)."),
        click.option("--mpp", "mpps", default="2,1,0.5,0.25", show_default=True, callback=_mpp_list,
                     help="Target magnifications in µm/px, comma-separated."),
        click.option("--tile-size", default=256, show_default=True, help="Tile side in pixels (512 for the high-res stage)."),
        click.option("--tiles-per-slide", type=int,
                     help="Tiles per slide, spread evenly over the magnifications [default: 1000 unless "
                          "--total-tiles]. Each (slide, µm/px) gives at most 16 x its tissue area / "
                          "the tile area (max_coverage in plan.json); the summary lists shortfalls."),
        click.option("--total-tiles", type=int, help="Total tiles, spread evenly over slides and magnifications."),
        click.option("--shard-size", default=1000, show_default=True, help="Samples per shard."),
        click.option("--seed", default=0, show_default=True, help="Global seed; same inputs + seed give byte-identical shards."),
        click.option("--foreground", default=0.4, show_default=True, help="Minimum tissue-mask fraction of a tile."),
        click.option("--hsv-min-fraction", default=0.6, show_default=True,
                     help="Minimum fraction of pixels in the HSV tissue range (OpenCV convention: H 90-180, S 8-255, V 103-255)."),
        click.option("--slides-per-job", default=8, show_default=True,
                     help="Slides per job; a job shuffles its slides' tiles together into its shards."),
        click.option("--group", default="default", show_default=True,
                     help="Dataset name stored in each sample (a slide list's 'group' column overrides it)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _plan_from_options(inputs, output, mpps, tile_size, tiles_per_slide, total_tiles, shard_size,
                       seed, foreground, hsv_min_fraction, slides_per_job, group) -> Plan:
    if tiles_per_slide is None and total_tiles is None:
        tiles_per_slide = 1000
    try:
        params = BuildParams(mpps=mpps, tile_size=tile_size, seed=seed, foreground=foreground,
                             hsv_min_fraction=hsv_min_fraction, shard_size=shard_size)
        return make_plan(list(inputs), output, params, tiles_per_slide, total_tiles, slides_per_job, group)
    except PlanError as e:
        raise click.UsageError(str(e)) from e


def _store_plan(plan: Plan) -> str:
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


def _plan_folder(source: str) -> str:
    return shards.folder_of(source) if source.endswith(".json") else source


def _load_plan(source: str) -> Plan:
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


def _select(plan: Plan, task: int, num_tasks: int, job_ids: str | None):
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


# How often a builder looks again at jobs that another builder is working on.
WAIT_S = 2.0


def _execute(plan: Plan, jobs, workers: int, verify: bool, retry_failed: bool,
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
    started = time.time()
    executor = executor or functools.partial(run_jobs, workers=workers)
    with sigterm_exits():
        ran, failed_jobs = _run_with_progress(plan, pending, executor, redo, done)
    summary = summarize(ran)
    click.echo(format_summary(summary, wall_seconds=time.time() - started if ran else None))
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


def _storage_options(ctx, param, value: str | None) -> dict | None:
    if value is None:
        return None
    try:
        options = json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not JSON ({e})") from e
    if not isinstance(options, dict):
        raise click.BadParameter('expected a JSON object, like {"client_kwargs": {"endpoint_url": "http://host:8333"}}')
    return options


STORAGE_OPTIONS = click.option(
    "--storage-options", callback=_storage_options, metavar="JSON",
    help="fsspec options for the output's storage (JSON object), e.g. "
         '\'{"client_kwargs": {"endpoint_url": "https://s3.example.org"}}\'. The standard AWS '
         "variables and files (AWS_ENDPOINT_URL, AWS_PROFILE, ~/.aws) are read anyway; prefer them "
         "for secrets (a command line is visible to other users). Never written to the output.")


def _use_storage(url: str, options: dict | None) -> None:
    """Apply --storage-options for ``url`` and look at it once (seconds, not the retry budget):
    a server that is down, refused credentials or a missing bucket end the command here."""
    storage.configure(url, options)
    storage.probe(url)


def one_line_errors(command):
    """Add --debug; without it an unexpected error ends as one line (what failed, and the hint),
    not a Python traceback."""
    @click.option("--debug", is_flag=True, help="On an error, show the Python traceback.")
    @functools.wraps(command)
    def wrapper(*args, debug: bool, **kwargs):
        click.get_current_context().meta["debug"] = debug
        try:
            return command(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except storage.StorageError as e:  # already one paragraph: where, and what to check
            if debug:
                raise
            raise click.ClickException(str(e)) from e
        except Exception as e:
            if debug:
                raise
            raise click.ClickException(f"{type(e).__name__}: {e} (run again with --debug for the "
                                       "traceback)") from e
    return wrapper


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        from .versions import describe

        click.echo(describe("midnight-prep"))
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the versions in use (PIL flavour: pillow or pillow-simd) and exit.")
def main() -> None:
    """Turn whole-slide images into filtered, multi-magnification webdataset shards.

    Typical use: `midnight-prep build SLIDES... --output OUT` (plan + run; rerun the same command
    to resume after a crash). For clusters: `plan` once, then `run OUT/plan.json --task I
    --num-tasks N` per SLURM array task (or one `run OUT/plan.json --executor ray` on a Ray
    cluster), and `status OUT` to follow progress. OUT may be s3://bucket/prefix.

    \b
    midnight-prep build slides/ --output out/ --workers 8
    midnight-prep build slides/ --output s3://bucket/run1 --executor ray --ray-address auto
    midnight-prep status out/
    midnight-prep inspect out/shards/job-000000-0000.tar --out sheet.png
    """


VERIFY = click.option("--verify", is_flag=True,
                      help="Also read every finished shard and compare its sha256 with the manifest "
                           "(sizes are always checked).")
RETRY_FAILED = click.option("--retry-failed", is_flag=True,
                            help="Redo finished jobs that have failed slides (after fixing them).")


def executor_options(f):
    opts = [
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: a process pool of --workers on this machine. ray: one Ray task per "
                          "job (pip install 'midnight[ray]'); the same shards either way."),
        click.option("--ray-address",
                     help="With --executor ray: the cluster to use ('auto': the one this node joined "
                          "with `ray start`) [default: a local Ray instance of --workers CPUs]."),
        click.option("--ray-jobs-per-worker", default=10, show_default=True, type=click.IntRange(min=1),
                     help="With --executor ray: a worker process is replaced after this many jobs "
                          "(bounds its memory)."),
        click.option("--ray-retries", default=3, show_default=True, type=click.IntRange(min=0),
                     help="With --executor ray: retries of a job whose worker died or that hit a "
                          "transient storage error."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@contextmanager
def _executor(executor: str, workers: int, ray_address: str | None, ray_jobs_per_worker: int,
              ray_retries: int):
    """(executor for `_execute`, what it is for messages); a Ray connection is closed after."""
    if executor == "local":
        if ray_address:
            raise click.UsageError("--ray-address needs --executor ray")
        yield None, f"with {workers} worker(s)"
        return
    from .ray_executor import RayExecutor, RayUnavailable, check_installed

    try:
        check_installed()
        with RayExecutor(ray_address, None if ray_address else workers, ray_retries,
                         ray_jobs_per_worker) as ray_executor:
            yield ray_executor, (f"on the Ray cluster at {ray_address}" if ray_address else
                                 f"on a local Ray instance of {workers} CPU(s)")
    except RayUnavailable as e:
        raise click.ClickException(str(e)) from e


def _stage_setting(ctx, param, value) -> None:
    """--stage-dir / --stage-max-gb reach every worker process through the environment."""
    from . import staging

    if value is not None:
        staging.configure(**{"root" if param.name == "stage_dir" else "max_gb": value})


def stage_options(f):
    """Where slides on object storage (s3://...) are copied while their job reads them."""
    f = click.option("--stage-max-gb", type=click.FloatRange(min=0, min_open=True), expose_value=False,
                     callback=_stage_setting,
                     help="Most GB of staged slides on this machine at once, all workers together "
                          "[default: 50, or half the free disk if less].")(f)
    return click.option("--stage-dir", type=click.Path(file_okay=False), expose_value=False,
                        callback=_stage_setting,
                        help="Local folder for slides read from object storage while their job "
                             "reads them (shared by the workers; each slide is removed after use) "
                             "[default: TMPDIR/midnight-slide-cache-UID].")(f)


@main.command()
@plan_options
@click.option("--workers", "-j", default=1, show_default=True, type=click.IntRange(min=1),
              help="Local worker processes.")
@executor_options
@VERIFY
@RETRY_FAILED
@stage_options
@STORAGE_OPTIONS
@one_line_errors
def build(workers, executor, ray_address, ray_jobs_per_worker, ray_retries, verify, retry_failed,
          storage_options, **options) -> None:
    """Plan and run: sample tiles from INPUTS (slide files, directories, or CSV slide lists with
    columns path[,slide_id,mpp,group]; local, or s3:// objects, prefixes and CSVs, staged
    onto local disk while read) into shards under --output. Resumable: run it again after
    any interruption and only the unfinished (or damaged) jobs are redone. Exit status 1 while a
    slide failed or nothing was written. For example:

    \b
    midnight-prep build slides/ --output out/ --workers 8
    midnight-prep build slides.csv --output s3://bucket/run1 --mpp 1,0.5 --total-tiles 1000000
    midnight-prep build slides/ --output out/ --tile-size 512 --mpp 0.5,0.25 --seed 1
    midnight-prep build slides/ --output out/ --retry-failed   # after fixing a failed slide
    midnight-prep build s3://bucket/slides/ --output s3://bucket/run2 -j 8 --stage-max-gb 20
    midnight-prep build slides.csv --output /shared/run1 --executor ray --ray-address auto
    """
    _use_storage(options["output"], storage_options)
    with _executor(executor, workers, ray_address, ray_jobs_per_worker, ray_retries) as (ex, where):
        plan = _plan_from_options(**options)
        _store_plan(plan)
        sys.exit(_execute(plan, plan.jobs, workers, verify, retry_failed, whole_output=True,
                          executor=ex, where=where))


def cost_options(f):
    opts = [
        click.option("--estimate", is_flag=True,
                     help="Print the cost model (tiles, shards, core-hours, wall time, slide bytes read, "
                          "shard bytes stored) without reading pixels; writes nothing, not even plan.json."),
        click.option("--dry-run", is_flag=True,
                     help="Check the whole recipe: slides there and readable, µm/px known (headers only), "
                          "output writable (a probe object, deleted again); print the cost model. "
                          "Writes no plan.json. Exit status 1 with the list of what failed."),
        click.option("--nodes", default=DEFAULT_NODES, show_default=True, type=click.IntRange(min=1),
                     help="With --estimate/--dry-run: nodes for the wall time."),
        click.option("--cores-per-node", default=DEFAULT_CORES_PER_NODE, show_default=True,
                     type=click.IntRange(min=1), help="With --estimate/--dry-run: workers per node."),
        click.option("--slide-sizes", type=click.Path(exists=True, dir_okay=False),
                     help="With --estimate/--dry-run: slide file sizes by file name from a GDC manifest "
                          "(id, filename, md5, size) or a CSV with filename/path and size, for slides "
                          "not downloaded yet."),
        click.option("--json", "as_json", is_flag=True, help="With --estimate/--dry-run: machine-readable."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _cost(options: dict, dry_run: bool, nodes: int, cores_per_node: int, sizes_file: str | None,
          as_json: bool) -> int:
    """`plan --estimate` / `plan --dry-run`: the cost model, after the recipe's checks with
    ``dry_run``; the exit status."""
    from .dryrun import dry_run as check
    from .estimate import estimate, format_estimate, slide_sizes

    plan = _plan_from_options(**options)
    try:
        sizes = slide_sizes([s.path for s in plan.slides], sizes_file)
    except (OSError, ValueError) as e:
        raise click.UsageError(f"--slide-sizes: {e}") from e
    cost = estimate(plan, nodes, cores_per_node, sizes)
    checked = check(plan) if dry_run else None
    if as_json:
        click.echo(json.dumps({"estimate": cost, **(checked or {})}, indent=1))
    else:
        if checked is not None:
            click.echo(f"dry run of {len(plan.slides)} slides, {len(plan.jobs)} jobs -> {plan.output}")
            for title, rows in (("problems", checked["problems"]), ("notes", checked["notes"])):
                if rows:
                    click.echo(f"  {title} ({len(rows)}):")
                    click.echo("\n".join(f"    {r}" for r in rows[:50]))
                    if len(rows) > 50:
                        click.echo(f"    ... and {len(rows) - 50} more (see --json)")
        click.echo(format_estimate(cost))
        if checked is not None:
            click.echo(f"dry run: {len(checked['problems'])} problem(s)" if checked["problems"] else
                       "dry run: everything checked is ready (no plan.json written)")
    return 1 if checked and checked["problems"] else 0


@main.command("plan")
@plan_options
@STORAGE_OPTIONS
@cost_options
@one_line_errors
def plan_cmd(storage_options, estimate, dry_run, nodes, cores_per_node, slide_sizes, as_json, **options) -> None:
    """Write OUTPUT/plan.json (the jobs, their slides and quotas) without running anything;
    then `midnight-prep run` it, anywhere and in any number of pieces. For example:

    \b
    midnight-prep plan slides.csv --output s3://bucket/tcga --total-tiles 100000000
    midnight-prep plan slides/ --output out/ --tiles-per-slide 2000 --slides-per-job 16
    midnight-prep plan slides.csv --output s3://bucket/tcga --total-tiles 100000000 --estimate \
        --nodes 4 --cores-per-node 32 --slide-sizes gdc_manifest.txt
    midnight-prep plan standin.csv --output s3://bucket/tcga-dry --total-tiles 1000 --dry-run
    """
    if estimate or dry_run:  # no first look at the output: the dry run probes it and lists what fails
        storage.configure(options["output"], storage_options)
        sys.exit(_cost(options, dry_run, nodes, cores_per_node, slide_sizes, as_json))
    _use_storage(options["output"], storage_options)
    plan = _plan_from_options(**options)
    url = _store_plan(plan)
    click.echo(f"{len(plan.jobs)} jobs, {len(plan.slides)} slides, "
               f"{sum(sum(s.quotas.values()) for s in plan.slides)} tiles asked -> {url}")


@main.command()
@click.argument("plan_source")
@click.option("--workers", "-j", default=1, show_default=True, type=click.IntRange(min=1),
              help="Local worker processes.")
@click.option("--task", default=0, show_default=True, type=click.IntRange(min=0), help="This task's index (e.g. $SLURM_ARRAY_TASK_ID).")
@click.option("--num-tasks", default=1, show_default=True, type=click.IntRange(min=1), help="Number of tasks sharing the plan; task I runs jobs I, I+N, ...")
@click.option("--jobs", "job_ids", help="Only these job ids (comma-separated).")
@executor_options
@VERIFY
@RETRY_FAILED
@stage_options
@STORAGE_OPTIONS
@one_line_errors
def run(plan_source, workers, task, num_tasks, job_ids, executor, ray_address, ray_jobs_per_worker,
        ray_retries, verify, retry_failed, storage_options) -> None:
    """Run the unfinished jobs of a plan (PLAN_SOURCE: plan.json or the output it lives in).
    Results go to the folder the plan is in. Jobs are locked while they run: several tasks or
    machines may share a plan, and a job another builder is working on is waited for. For
    example:

    \b
    midnight-prep run out/plan.json --workers 8
    midnight-prep run s3://bucket/tcga/plan.json --task $SLURM_ARRAY_TASK_ID \\
        --num-tasks $SLURM_ARRAY_TASK_COUNT --workers $SLURM_CPUS_PER_TASK
    midnight-prep run out/ --jobs job-000003,job-000007 --verify
    midnight-prep run s3://bucket/tcga/plan.json --executor ray --ray-address auto
    """
    _use_storage(_plan_folder(plan_source), storage_options)
    with _executor(executor, workers, ray_address, ray_jobs_per_worker, ray_retries) as (ex, where):
        plan = _load_plan(plan_source)
        sys.exit(_execute(plan, _select(plan, task, num_tasks, job_ids), workers, verify,
                          retry_failed, executor=ex, where=where))


@main.command()
@click.argument("plan_source")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@VERIFY
@STORAGE_OPTIONS
@one_line_errors
def status(plan_source, as_json, verify, storage_options) -> None:
    """What is done, running, left, failed and damaged (missing or truncated shards), who is
    working on what (lock heartbeats, with their slides and tiles so far), tiles per µm/px,
    throughput and a projected finish; readable while builders run on other machines. Exit
    status 1 when something failed or is damaged. For example:

    \b
    midnight-prep status out/
    midnight-prep status s3://bucket/tcga --json
    midnight-prep status out/ --verify   # also compare every shard's sha256
    """
    _use_storage(_plan_folder(plan_source), storage_options)
    plan = _load_plan(plan_source)
    try:
        states = check_jobs(plan.output, plan.sha256(), [j.job_id for j in plan.jobs], verify)
        others = other_manifests(plan.output, {j.job_id for j in plan.jobs})
        held = locks.read_locks(plan.output)
    except OSError as e:
        raise click.ClickException(f"cannot read {plan.output}: {e}") from e
    finished = [s.manifest for s in states.values() if s.kind == "done"]
    left = [job_id for job_id, s in states.items() if s.kind != "done"]
    foreign = [s for s in states.values() if s.kind == "foreign"]
    damaged = [s for s in states.values() if s.kind == "damaged"]
    summary = summarize(finished)
    flight = run_status(plan, states, held)
    if as_json:
        click.echo(json.dumps({"jobs": len(plan.jobs), "done": len(finished), "left": left,
                               "samples": summary["samples"], "failed": summary["failed"],
                               "damaged": {s.job_id: s.why for s in damaged},
                               "foreign": {s.job_id: s.why for s in foreign},
                               "other_manifests": others,
                               "locks": {job_id: {**info.holder, "stale": info.stale,
                                                  "heartbeat_age_s": round(info.age_s, 1)}
                                         for job_id, info in held.items()},
                               **flight}, indent=1))
    else:
        click.echo(f"{len(finished)}/{len(plan.jobs)} jobs done, {len(left)} left"
                   + (f" (first: {', '.join(left[:5])})" if left else ""))
        click.echo("\n".join(format_status(flight)))
        for job_id, info in held.items():
            if info.stale:
                click.echo(f"  {job_id}: stale lock of {locks.describe(info.holder)} (its builder is "
                           "gone; the next run takes it over)")
        if damaged:
            click.echo(f"  damaged ({len(damaged)}; `midnight-prep run {plan_source}` redoes them):")
            click.echo("\n".join(f"    {s.job_id}: {s.why}" for s in damaged[:20]))
        if foreign or others:
            click.echo(foreign_message(plan.output, foreign, others).replace(", so nothing was run", ""))
        click.echo(format_summary(summary, brief=True))
    sys.exit(1 if summary["failed"] or damaged or foreign or others else 0)


@main.command()
@click.argument("shard_urls", nargs=-1, required=True)
@click.option("--out", "out_png", default="contact-sheet.png", show_default=True, help="Contact sheet PNG to write.")
@click.option("--count", default=48, show_default=True, type=click.IntRange(min=0), help="Tiles on the sheet.")
@one_line_errors
def inspect(shard_urls, out_png, count) -> None:
    """Per-shard statistics and a contact sheet of tiles labelled with their µm/px. For example:

    \b
    midnight-prep inspect out/shards/job-000000-0000.tar --out sheet.png
    midnight-prep inspect out/shards/*.tar --count 96
    """
    from .inspect import contact_sheet, shard_stats

    tiles, unreadable = [], 0
    for url in shard_urls:
        try:
            stats, sample = shard_stats(url, keep=max(0, count - len(tiles)))
        except Exception as e:
            if click.get_current_context().meta.get("debug"):
                raise
            what = ("cannot be opened" if isinstance(e, shards.ShardOpenError) else
                    "is not a readable shard (truncated, or not a tar file)")
            click.echo(f"{url}: {what}: {type(e).__name__}: {e}", err=True)
            unreadable += 1
            continue
        tiles += sample
        click.echo(f"{url}: {stats['samples']} samples, {stats['bytes']} bytes; per µm/px "
                   + ", ".join(f"{k}: {v}" for k, v in sorted(stats['per_mpp'].items(), key=lambda kv: -float(kv[0])))
                   + f"; slides {stats['slides']}; mean foreground {stats['foreground']:.2f}, "
                   f"mean HSV fraction {stats['hsv_fraction']:.2f}")
    contact_sheet(tiles, out_png)
    click.echo(f"contact sheet of {len(tiles)} tiles -> {out_png}")
    sys.exit(1 if unreadable else 0)


if __name__ == "__main__":
    main()

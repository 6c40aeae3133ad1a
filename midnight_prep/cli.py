"""`midnight-prep`: whole-slide images -> filtered multi-magnification webdataset shards. The
commands; their shared options are in `cli_options`, what they do with plans and jobs in
`cli_jobs`."""

from __future__ import annotations

import json
import sys

import click

from . import locks, shards, storage
from .cli_jobs import (
    execute,
    executor_for,
    load_plan,
    plan_folder,
    plan_from_options,
    select_jobs,
    store_plan,
    use_storage,
)
from .cli_options import (
    RETRY_FAILED,
    STORAGE_OPTIONS,
    VERIFY,
    cost_options,
    executor_options,
    one_line_errors,
    plan_options,
    stage_options,
)
from .jobstate import check_jobs, foreign_message, other_manifests
from .progress import format_status, run_status
from .report import format_summary, summarize


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
    use_storage(options["output"], storage_options)
    with executor_for(executor, workers, ray_address, ray_jobs_per_worker, ray_retries) as (ex, where):
        plan = plan_from_options(**options)
        store_plan(plan)
        sys.exit(execute(plan, plan.jobs, workers, verify, retry_failed, whole_output=True,
                          executor=ex, where=where))


def _cost(options: dict, dry_run: bool, nodes: int, cores_per_node: int, sizes_file: str | None,
          as_json: bool) -> int:
    """`plan --estimate` / `plan --dry-run`: the cost model, after the recipe's checks with
    ``dry_run``; the exit status."""
    from .dryrun import dry_run as check
    from .estimate import estimate, format_estimate, slide_limits, slide_sizes

    plan = plan_from_options(**options)
    try:
        sizes = slide_sizes([s.path for s in plan.slides], sizes_file)
    except (OSError, ValueError) as e:
        raise click.UsageError(f"--slide-sizes: {e}") from e
    cost = estimate(plan, nodes, cores_per_node, sizes, slide_limits(plan))
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
    use_storage(options["output"], storage_options)
    plan = plan_from_options(**options)
    url = store_plan(plan)
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
    use_storage(plan_folder(plan_source), storage_options)
    with executor_for(executor, workers, ray_address, ray_jobs_per_worker, ray_retries) as (ex, where):
        plan = load_plan(plan_source)
        sys.exit(execute(plan, select_jobs(plan, task, num_tasks, job_ids), workers, verify,
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
    use_storage(plan_folder(plan_source), storage_options)
    plan = load_plan(plan_source)
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

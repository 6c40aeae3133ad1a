"""The command-line options `midnight-prep`'s commands share (decorators), and the one-line error
handling every command has."""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from . import storage
from .estimate import DEFAULT_CORES_PER_NODE, DEFAULT_NODES


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
        except BrokenPipeError:  # `... | head` stopped reading: nothing to say, nobody to say it to
            # Python's own flush at exit would complain on stderr: send the rest nowhere.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
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

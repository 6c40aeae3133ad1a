"""`midnight-train` command line: the group, `fit` and `recipe`; `data …` lives in cli_data.py,
`export`, `embed` and `eval` in cli_outputs.py. Heavy imports (torch, timm, accelerate) happen
inside each command, so `--help` is quick."""

from __future__ import annotations

import click

from midnight_train.cli_data import data
from midnight_train.cli_outputs import embed, evaluate, export


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    import timm
    import torch

    from midnight_prep.versions import describe

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    click.echo(describe("midnight-train", (
        f"torch {torch.__version__} (CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{gpu}), timm {timm.__version__}",)))
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the versions in use (PIL flavour, torch, timm) and exit.")
def main() -> None:
    """Train pathology foundation models on midnight-prep shards or straight from the slides
    (DINOv2 with the Midnight recipe), export them for timm, and embed tiles.

    \b
      midnight-train data preview OUT --out preview.png
      accelerate launch -m midnight_train fit examples/tiny-cpu.yaml data.shards=OUT
      midnight-train export out/train exports/tiny
      midnight-train embed exports/tiny tiles/ --out embeddings.npz
    """



# ----------------------------------------------------------------------------- training


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--debug", is_flag=True, help="On an error, show the Python traceback.")
def fit(config_path: str, overrides: tuple[str, ...], debug: bool) -> None:
    """Train with CONFIG (YAML) and dotted key=value OVERRIDES, e.g.

    \b
    midnight-train fit examples/tiny-cpu.yaml data.shards=out/shards output_dir=out/train
    accelerate launch -m midnight_train fit CONFIG output_dir=out/train resume=auto

    SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before preemption) ends the run after
    the current optimiser step with a checkpoint and exit status 75 ("preempted, resume with
    resume=auto"); a second signal exits at once.

    A new run needs an empty or new output_dir; these keys say what to do with an earlier run:

    \b
    resume=auto      continue from the newest readable checkpoint in output_dir
                     (damaged ones are skipped and named; none yet: start at step 0)
    resume=PATH      continue from the checkpoint directory PATH
    overwrite=true   replace the run in output_dir (checkpoints, metrics, config, logs)
    resume_allow_changes=true
                     continue although the config changes what is trained (data, model,
                     losses, lr, seed ...); by default only keys such as train.max_steps,
                     train.checkpoint_every and train.log_every may differ from the
                     checkpoint's config, and the refusal lists the differences
    """
    from midnight_prep.storage import StorageError
    from midnight_train.config import load_config
    from midnight_train.data.config import DataError
    from midnight_train.loop.checkpoint import CheckpointError
    from midnight_train.loop.errors import RunError
    from midnight_train.loop.signals import Preempted
    from midnight_train.loop.trainer import fit as train
    from midnight_train.typed_yaml import ConfigError

    try:
        cfg = load_config(config_path, overrides)
    except (ConfigError, ValueError) as err:
        if debug:
            raise
        raise click.UsageError(str(err)) from err
    try:
        train(cfg)
    except Preempted as err:  # the main process has printed why and what to do
        raise SystemExit(err.exit_code) from None
    except (RunError, CheckpointError, StorageError, FileNotFoundError, ValueError) as err:
        if debug:
            raise
        raise click.ClickException(str(err)) from err
    except RuntimeError as err:
        # torch re-raises a loader worker's error with that worker's whole traceback in the
        # message; its last line says what went wrong (--debug shows all of it)
        in_worker = "in DataLoader worker process" in str(err)
        if debug or not (in_worker or isinstance(err, DataError)):
            raise
        if not in_worker:
            raise click.ClickException(str(err)) from None
        worker_error = [line for line in str(err).splitlines() if line.strip()][-1]
        raise click.ClickException(f"a data loader worker failed: {worker_error}") from None


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("config_path", metavar="CONFIG", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--gpus", type=click.IntRange(min=1),
              help="GPUs (processes) of the run: completes the batch and the peak lr.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def recipe(config_path: str, overrides: tuple[str, ...], gpus: int | None, as_json: bool) -> None:
    """Print the recipe CONFIG trains (with key=value OVERRIDES) beside the Midnight paper's
    values and DINOv2's ViT-g/14 recipe, marking each difference and where the paper is silent.

    \b
    midnight-train recipe examples/midnight-12k.yaml --gpus 32
    Every run writes the same table (at its process count) as recipe.md / recipe.json in its
    output_dir.
    """
    from midnight_train.config import load_config
    from midnight_train.method.recipe import recipe_json, recipe_markdown, recipe_rows
    from midnight_train.typed_yaml import ConfigError

    try:
        cfg = load_config(config_path, overrides)
        rows = recipe_rows(cfg, gpus)
    except (ConfigError, ValueError) as err:
        raise click.UsageError(str(err)) from err
    click.echo((recipe_json if as_json else recipe_markdown)(rows, config_path), nl=False)


main.add_command(data)
for _command in (export, embed, evaluate):
    main.add_command(_command)

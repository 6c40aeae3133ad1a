"""`midnight-train` command line: `fit`, `export`, `embed`, `data inspect`, `data preview`.
Heavy imports (torch, timm, accelerate) happen inside each command, so `--help` is quick."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import click


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


@main.group()
def data() -> None:
    """Inspect the training input pipeline."""


def _source_and_overrides(args: tuple[str, ...], config_path: str | None) -> tuple[str | None, list[str]]:
    """Split `data inspect/preview` arguments into a SOURCE and `section.key=value` overrides
    (these only with a --config, as `fit` takes them)."""
    overrides = [a for a in args if re.match(r"[A-Za-z_][\w.]*=", a)]
    sources = [a for a in args if a not in overrides]
    if len(sources) > 1:
        raise click.UsageError(f"one SOURCE at most (got {', '.join(sources)})")
    if overrides and config_path is None:
        raise click.UsageError(f"{overrides[0]}: key=value overrides need a --config")
    return (sources[0] if sources else None), overrides


@data.command()
@click.argument("args", metavar="[SOURCE] [KEY=VALUE]...", nargs=-1)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Training YAML: inspect its data source (shards, or slides drawn online); "
                   "KEY=VALUE overrides it as in `fit`.")
@click.option("--samples", "n_samples", default=200, show_default=True,
              help="Shards: read the JSON and decode the JPEG of this many samples (from the "
                   "first shards). Slides: draw this many tiles.")
@click.option("--count-shards", default=16, show_default=True,
              help="Without manifests, count the samples of at most this many shards.")
@click.option("--seed", default=0, show_default=True, help="Slides: the seed of the draws.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(args: tuple[str, ...], config_path: str | None, n_samples: int, count_shards: int,
            seed: int, as_json: bool) -> None:
    """Summarise a shard SOURCE, or the data source of a training --config.

    Shards: shards found, samples per shard (from the shard builder's manifests when present,
    else by counting), groups, µm/px and tile sizes of the first samples, and the
    damaged/skipped samples met on the way.

    Slides (data.slides or datasets of slides, online patching): --samples tiles drawn as one
    training stream draws them, with the acceptance per µm/px and per slide (candidates,
    accepted, rejected for foreground, HSV or a failed read), the µm/px a slide cannot give,
    the slides dropped and why, and the tile sizes.

    \b
      midnight-train data inspect out/                  # a midnight-prep output directory
      midnight-train data inspect 's3://bucket/tcga-100M/shards/job-{000000..000099}-0000.tar' --json
      midnight-train data inspect --config examples/midnight-12k.yaml --samples 500
      midnight-train data inspect --config examples/tiny-cpu.yaml data.slides=slides/
    """
    import json

    from midnight_train.config import load_config
    from midnight_train.data.preview import format_inspection, inspect_slides, inspect_source
    from midnight_train.typed_yaml import ConfigError

    source, overrides = _source_and_overrides(args, config_path)
    if (source is None) == (config_path is None):
        raise click.UsageError("give a shard SOURCE or a --config (not both)")
    try:
        if source is not None:
            infos = [inspect_source(source, n_samples=n_samples, count_shards=count_shards)]
        else:
            try:
                data_cfg = load_config(config_path, overrides).data
            except (ConfigError, ValueError) as err:
                raise click.UsageError(str(err)) from err
            if data_cfg.source_kind() == "slides":
                infos = [inspect_slides(data_cfg, n_draws=n_samples, seed=seed)]
            else:
                infos = [{"dataset": spec.get("name"),
                          **inspect_source(spec["shards"], n_samples=n_samples, count_shards=count_shards)}
                         for spec in data_cfg.dataset_specs()]
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps(infos[0] if len(infos) == 1 else infos, indent=1))
    else:
        click.echo("\n\n".join((f"dataset {i['dataset']}:\n" if len(infos) > 1 else "")
                                + format_inspection(i) for i in infos))


@data.command()
@click.argument("args", metavar="[SOURCE] [KEY=VALUE]...", nargs=-1)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="Training YAML; its data: and augment: sections are used (KEY=VALUE "
                   "overrides them as in `fit`).")
@click.option("--out", "out_path", default="preview.png", show_default=True, type=click.Path())
@click.option("--samples", default=4, show_default=True, type=click.IntRange(min=1),
              help="Rows (samples) in the grid.")
@click.option("--seed", default=0, show_default=True)
@click.option("--hed-only", is_flag=True, help="Only HED jitter (no colour jitter, grey, blur, solarize).")
@click.option("--hed-sigma-alpha", type=float, help="Override augment.hed_sigma_alpha.")
@click.option("--hed-sigma-beta", type=float, help="Override augment.hed_sigma_beta.")
def preview(args: tuple[str, ...], config_path: str | None, out_path: str, samples: int, seed: int,
            hed_only: bool, hed_sigma_alpha: float | None, hed_sigma_beta: float | None) -> None:
    """Write a PNG grid: per sample the original tile, its augmented global and local crops,
    cut and augmented by the training pipeline's own functions.

    SOURCE is a shard source (output directory, brace pattern, .tar, prefix, fsspec URL);
    it replaces the config's data source. The config is read and checked exactly as `fit`
    reads it; with a slide source (data.slides, online patching) the tiles are drawn from the
    slides as a training stream draws them (--seed).

    \b
      midnight-train data preview out/ --out preview.png
      midnight-train data preview --config examples/midnight-12k.yaml --hed-only --samples 8
      midnight-train data preview --config examples/tiny-cpu.yaml data.slides=slides/
    """
    from midnight_train.config import load_config
    from midnight_train.data.preview import render_preview
    from midnight_train.typed_yaml import ConfigError

    try:
        source, overrides = _source_and_overrides(args, config_path)
        cfg = load_config(config_path, [*overrides, *([f"data.shards={source}"] if source else [])])
    except (ConfigError, ValueError) as err:
        hint = "" if source or config_path else " (give a SOURCE or a --config with a data source)"
        raise click.UsageError(f"{err}{hint}") from err
    data_cfg, aug_cfg = cfg.data, cfg.augment
    overrides = {k: v for k, v in (("hed_sigma_alpha", hed_sigma_alpha), ("hed_sigma_beta", hed_sigma_beta)) if v is not None}
    if hed_only:
        overrides.update(jitter_p=0.0, grayscale_p=0.0, blur_p_global1=0.0, blur_p_global2=0.0,
                         blur_p_local=0.0, solarize_p_global2=0.0, hed_p=1.0)
    aug_cfg = dataclasses.replace(aug_cfg, **overrides)
    try:
        path = render_preview(data_cfg, aug_cfg, out_path, n_samples=samples, seed=seed)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"wrote {path}")


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


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--which", type=click.Choice(["teacher", "student"]), default="teacher",
              show_default=True)
@click.option("--img-size", type=click.IntRange(min=1), help="Resample the position embedding to "
              "this input size, a multiple of the patch size (e.g. 392 after the high-resolution stage).")
@click.option("--debug", is_flag=True, help="On an error, show the Python traceback.")
def export(checkpoint: str, out: str, which: str, img_size: int | None, debug: bool) -> None:
    """Write the backbone of CHECKPOINT (a checkpoint directory, or a training output directory:
    its newest readable checkpoint) as a model folder OUT: model.safetensors, timm's
    config.json, a model card README.md and training_config.json. Plain timm loads it without
    midnight, and the folder can be pushed to a model hub as it is. OUT is new, empty or an
    earlier export (replaced). `embed` and `eval` read config.json, as timm does.

    \b
      midnight-train export runs/tiny exports/tiny
      midnight-train export runs/midnight-highres exports/midnight-392 --img-size 392
      python -c 'import timm; timm.create_model("local-dir:exports/tiny", pretrained=True)'
    """
    from midnight_train.loop.checkpoint import CheckpointError
    from midnight_train.outputs.export import export_backbone, read_metadata

    skipped: list[str] = []
    kept: list[str] = []
    try:
        path = export_backbone(checkpoint, out, which=which, img_size=img_size, skipped=skipped,
                               kept=kept)
    except (CheckpointError, ValueError) as err:
        if debug:
            raise
        raise click.ClickException(str(err)) from err
    for reason in skipped:
        click.echo(f"warning: skipped damaged checkpoint: {reason}", err=True)
    if kept:
        click.echo(f"replaced the earlier export in {out}; kept its other files: "
                   f"{', '.join(kept)}", err=True)
    meta = read_metadata(path)
    click.echo(f"wrote {path}/ ({meta['arch']}, {which}, step {meta['step']}): "
               f"timm.create_model('local-dir:{path}', pretrained=True)")


@main.command()
@click.argument("weights", type=click.Path(exists=True))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "out_path", default="embeddings.npz", show_default=True,
              help="An .npz, or a .parquet table with one row per tile (in an existing folder; "
                   "replaced only once the embeddings are complete).")
@click.option("--img-size", type=click.IntRange(min=1),
              help="Resize tiles to this size, a multiple of the patch size (default: the export's).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0),
              help="DataLoader workers decoding and resizing (each takes whole inputs: a shard, "
                   "an image file).")
@click.option("--cls-only", is_flag=True, help="Only the CLS token (default: CLS+Mean).")
@click.option("--mpp", "mpps", default="0.5", show_default=True,
              help="Whole-slide inputs: tiles at these µm/px (comma-separated).")
@click.option("--tiles-per-slide", default=100, show_default=True, type=click.IntRange(min=1),
              help="Whole-slide inputs: tiles per slide and µm/px, cut as midnight-prep cuts them.")
@click.option("--tile-size", default=256, show_default=True, help="Whole-slide inputs: tile side in px.")
@click.option("--seed", default=0, show_default=True, help="Whole-slide inputs: sampling seed.")
def embed(weights: str, inputs: tuple[str, ...], out_path: str, img_size: int | None,
          batch_size: int, workers: int, cls_only: bool, mpps: str, tiles_per_slide: int,
          tile_size: int, seed: int) -> None:
    """CLS+Mean embeddings of INPUTS (images, directories, .tar shards; local paths or fsspec
    URLs; whole slides and slide lists (CSV: path, slide_id, mpp), tiled as midnight-prep tiles
    them) with exported WEIGHTS; writes `keys`, `embeddings` and, for shard samples,
    `slide_id`, `mpp`, `x`, `y` to an .npz or a .parquet table. Unreadable images and damaged
    shards are skipped and listed. A .tif/.tiff that OpenSlide opens as a pyramid is a slide,
    any other an image.

    \b
      midnight-train embed exports/tiny tiles/ --out embeddings.npz
      midnight-train embed exports/tiny s3://bucket/run/shards/job-000000-0000.tar
      midnight-train embed exports/tiny slides/*.svs --mpp 1,0.5 --tiles-per-slide 50 --out s.parquet
    """
    from midnight_prep.plan import BuildParams, PlanError
    from midnight_train.outputs.embed import SlideSampling, embed_inputs

    try:
        sampling = SlideSampling(tuple(float(m) for m in mpps.split(",")), tiles_per_slide,
                                 tile_size, seed)
        BuildParams(mpps=sampling.mpps, tile_size=tile_size, seed=seed)  # the builder's checks
    except (ValueError, PlanError) as err:
        raise click.UsageError(f"whole-slide options: {err}") from err
    from midnight_train.outputs.export import ExportError

    skipped: list[str] = []
    try:
        n, dim = embed_inputs(weights, list(inputs), out_path, img_size=img_size,
                              batch_size=batch_size, num_workers=workers, cls_only=cls_only,
                              progress=True, sampling=sampling, skipped=skipped)
    except ExportError as err:
        raise click.ClickException(str(err)) from err
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    if n:
        click.echo(f"wrote {out_path}: {n} embeddings of dimension {dim}")
    if skipped:
        click.echo(f"skipped {len(skipped)} unreadable input(s):", err=True)
        for line in skipped[:20]:
            click.echo(f"  {line}", err=True)
        if len(skipped) > 20:
            click.echo(f"  … and {len(skipped) - 20} more", err=True)
    if not n:
        raise click.ClickException(f"no readable image in {' '.join(inputs)}; nothing written "
                                   f"to {out_path}")


@main.command(name="eval")
@click.argument("weights", type=click.Path(exists=True))
@click.option("--train", "train_path", required=True, type=click.Path(exists=True),
              help="Labelled training tiles: a folder of class folders, a CSV (path,label) or an "
                   ".npz (embeddings, labels).")
@click.option("--test", "test_path", required=True, type=click.Path(exists=True),
              help="Labelled test tiles, in the same forms.")
@click.option("--methods", default="knn,linear,fewshot", show_default=True,
              help="Comma-separated: knn (cosine, k votes weighted by exp(sim/0.07)), linear "
                   "(logistic regression on standardised embeddings), fewshot.")
@click.option("--k", default=20, show_default=True, type=click.IntRange(min=1),
              help="Neighbours for knn.")
@click.option("--shots", default=10, show_default=True, type=click.IntRange(min=1),
              help="Training tiles per class for fewshot.")
@click.option("--repeats", default=10, show_default=True, type=click.IntRange(min=1),
              help="Few-shot draws (mean ± std).")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--workers", default=4, show_default=True, type=click.IntRange(min=0),
              help="DataLoader workers decoding images.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Also write the results as JSON here ('-' for standard output).")
def evaluate(weights: str, train_path: str, test_path: str, methods: str, k: int, shots: int,
             repeats: int, seed: int, batch_size: int, workers: int, json_path: str | None) -> None:
    """Balanced accuracy of frozen CLS+Mean embeddings of exported WEIGHTS on labelled tiles,
    as the paper reports it: kNN, linear probe and few-shot.

    \b
      midnight-train eval exports/tiny --train bach/train --test bach/test
      midnight-train eval exports/tiny --train train.npz --test test.npz --methods knn
    """
    import json

    from midnight_train.outputs.evaluate import embed_labelled, format_results, load_labelled
    from midnight_train.outputs.evaluate import evaluate as run_evaluation

    if json_path and json_path != "-" and not Path(json_path).resolve().parent.is_dir():
        raise click.UsageError(f"--json {json_path}: the folder {Path(json_path).parent} does not exist")
    try:
        sets = [load_labelled(train_path), load_labelled(test_path)]
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    skipped: list[str] = []
    embedder = None

    def embed(paths: list[str]):
        nonlocal embedder
        from midnight_train.outputs.embed import Embedder

        embedder = embedder or Embedder(weights, batch_size=batch_size, num_workers=workers,
                                        slides=False)
        keys, x, _ = embedder(paths, skipped.append, progress=True)
        return keys, x

    try:
        (train_x, train_y), (test_x, test_y) = embed_labelled(sets, embed)
    except ValueError as err:  # ExportError: an export it cannot use
        raise click.ClickException(str(err)) from err
    for line in skipped:
        click.echo(f"skipped {line}", err=True)
    for name, given, x in (("--train", sets[0], train_x), ("--test", sets[1], test_x)):
        if given.paths and not len(x):
            raise click.ClickException(f"{name}: none of its {len(given.paths)} images could be "
                                       f"read (see the skipped lines above)")
    try:
        results = run_evaluation(
            train_x, train_y, test_x, test_y, k=k, shots=shots, repeats=repeats, seed=seed,
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
            warn=lambda line: click.echo(f"warning: {line}", err=True))
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    click.echo(format_results(results, f"{len(train_y)} training / {len(test_y)} test tiles, "
                                       f"{len(set(train_y))} classes"))
    if json_path:
        text = json.dumps(results, indent=1, allow_nan=False)
        if json_path == "-":
            click.echo(text)
        else:
            Path(json_path).write_text(text + "\n")

"""`midnight-train export`, `embed` and `eval`: what a trained run hands on."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
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


@click.command()
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


@click.command(name="eval")
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

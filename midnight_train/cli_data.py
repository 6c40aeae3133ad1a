"""`midnight-train data …`: look at the training input pipeline before training on it."""

from __future__ import annotations

import dataclasses
import re

import click


@click.group()
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

"""The recipe a config trains, side by side with its two sources: the Midnight paper and DINOv2's
ViT-g/14 recipe (its public ``ssl_default_config.yaml`` with the ``vitg14.yaml`` overrides, and
its code where the config does not say). ``recipe_rows(cfg)`` gives one row per setting that
defines the method; ``recipe_markdown`` / ``recipe_json`` print it (``midnight-train recipe``
and every run's ``recipe.md`` / ``recipe.json``).

A source value of ``None`` means that source does not say (the paper is silent on most of
DINOv2's settings); ``Text`` is said in words only, shown but never compared. The paper's
high-resolution stage (a config with 392 px global crops) has its own stated numbers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from midnight_train.method.schedules import lr_batch, scaled_lr


@dataclass(frozen=True)
class Text:
    """A source's value said in words: shown, never compared."""

    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Row:
    group: str
    setting: str
    ours: Any
    paper: Any  # None: the paper does not say
    dinov2: Any  # None: not a DINOv2 setting (pathology tiles, KDE)
    note: str = ""

    @property
    def paper_silent(self) -> bool:
        return self.paper is None

    @property
    def differs_from_paper(self) -> bool:
        return comparable(self.paper) and not same(self.ours, self.paper)

    @property
    def differs_from_dinov2(self) -> bool:
        return comparable(self.dinov2) and not same(self.ours, self.dinov2)

    def marks(self) -> str:
        marks = []
        if self.differs_from_paper:
            marks.append("≠ paper")
        if self.paper_silent:
            marks.append("paper silent")
        if self.differs_from_dinov2:
            marks.append("≠ DINOv2")
        return ", ".join(marks)


def comparable(value: Any) -> bool:
    return value is not None and not isinstance(value, Text)


def same(a: Any, b: Any) -> bool:
    """Equal, floats to 1e-6 relative, sequences element-wise."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def show(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " / ".join(show(v) for v in value)
    return str(value)


# DINOv2 ViT-g/14: 500 "epochs" of 1 250 iterations; warm-up 80 of them, teacher temperature
# warm-up 30, last layer frozen for 1.
DINOV2_ITERS_PER_EPOCH = 1250
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_high_res(cfg) -> bool:
    return cfg.data.global_crop_size >= 392


def recipe_rows(cfg, gpus: int | None = None) -> list[Row]:
    """The rows for ``cfg`` (a ``midnight_train.config.Config``); ``gpus`` (the run's process
    count, if known) completes the batch and the peak lr."""
    d, a, m, loss, t = cfg.data, cfg.augment, cfg.model, cfg.loss, cfg.train
    hr = is_high_res(cfg)
    P = {  # the paper's stated numbers, 224 px stage / high-resolution stage
        "mpps": [1.0, 0.5, 0.25, 0.125] if hr else [2.0, 1.0, 0.5, 0.25],
        "tile": 512 if hr else 256, "global": 392 if hr else 224, "local": 168 if hr else None,
        "batch": 6 if hr else 12, "gpus": 48 if hr else 32, "accum": 4 if hr else 2,
        "lr": 1e-4 if hr else 3.5e-4, "steps": 120_000 if hr else 1_000_000,
    }
    rows: list[Row] = []

    def row(group: str, setting: str, ours: Any, paper: Any, dinov2: Any, note: str = "") -> None:
        rows.append(Row(group, setting, ours, paper, dinov2, note))

    slides = d.source_kind() == "slides"
    tiles = d.tile_params() if slides else None
    row("data", "source", "online patching" if slides else "shards", "online patching", None,
        "the paper's models draw tiles from the slides during training; tcga-100M (shards) is "
        "its ablation")
    from_shards = Text("as the shards were built")
    row("data", "tile µm/px", list(tiles.mpps) if tiles else from_shards, P["mpps"], None)
    row("data", "tile size (px)", tiles.tile_size if tiles else from_shards, P["tile"], None)
    row("data", "min tissue fraction", tiles.foreground if tiles else from_shards, 0.4, None)
    row("data", "HSV filter: min fraction of pixels",
        tiles.hsv_min_fraction if tiles else from_shards, 0.6, None)
    row("crops", "global crops: size (px)", d.global_crop_size, P["global"], 224)
    row("crops", "global crops: scale", list(d.global_crop_scale), None, [0.32, 1.0])
    row("crops", "local crops: number", d.n_local_crops, None, 8)
    row("crops", "local crops: size (px)", d.local_crop_size, P["local"], 98)
    row("crops", "local crops: scale", list(d.local_crop_scale), None, [0.05, 0.32])
    flips = "8 flips/rotations" if d.vflip_rot90 else ("horizontal flip" if d.hflip else "none")
    row("crops", "flips", flips, None, "horizontal flip")
    row("augment", "HED stain jitter: p", a.hed_p, Text("used"), 0.0)
    row("augment", "colour jitter: p", a.jitter_p, None, 0.8)
    row("augment", "colour jitter: brightness / contrast / saturation / hue",
        [a.brightness, a.contrast, a.saturation, a.hue], None, [0.4, 0.4, 0.2, 0.1])
    row("augment", "grayscale: p", a.grayscale_p, None, 0.2)
    row("augment", "blur p: global 1 / global 2 / local", list(a.blur_probabilities()), None,
        [0.0, 0.9, 0.5], f"augment.blur_convention={a.blur_convention}; DINOv2's released code "
        f"inverts its intended 1.0 / 0.1 / 0.5")
    row("augment", "blur σ", list(a.blur_sigma), None, [0.1, 2.0])
    row("augment", "solarize p (global crop 2)", a.solarize_p_global2, None, 0.2)
    row("augment", "normalisation mean", list(a.mean), [0.5, 0.5, 0.5], list(IMAGENET_MEAN),
        "the paper's: as the published Midnight-12k's model card")
    row("augment", "normalisation std", list(a.std), [0.5, 0.5, 0.5], list(IMAGENET_STD))
    row("masks", "iBOT: share of masked images", d.mask_sample_probability, None, 0.5)
    row("masks", "iBOT: mask ratio", list(d.mask_ratio_min_max), None, [0.1, 0.5])
    row("masks", "iBOT: min block (patches)", d.mask_min_patches, None, 4)
    row("model", "architecture", m.arch, "vit_giant_patch14_dinov2", "vit_giant_patch14_dinov2")
    start = "the 224 px stage's model" if hr else "the public DINOv2 ViT-g/14 weights"
    row("model", "initial weights", "pretrained" if m.pretrained else "random", "pretrained",
        "random", f"paper: {start}; model.pretrained={m.pretrained}")
    row("model", "iBOT mask token", "from the weights" if m.pretrained else "zeros", None, "zeros")
    row("model", "drop path rate", m.drop_path_rate, None, 0.4)
    row("model", "drop path in every block (uniform)", m.drop_path_uniform, None, True)
    row("model", "layer scale init", m.layer_scale_init, None, 1e-5)
    row("model", "position grid for other crop sizes", "bicubic, antialias (timm)", None,
        "bicubic, no antialias, offset 0.1", "what the exported model meets in plain timm")
    row("heads", "DINO head: prototypes", m.head_n_prototypes, None, 131072)
    row("heads", "DINO head: hidden / bottleneck / layers",
        [m.head_hidden_dim, m.head_bottleneck_dim, m.head_nlayers], None, [2048, 384, 3])
    row("heads", "iBOT head: separate", m.ibot_separate_head, None, True)
    ibot_bottleneck = m.ibot_bottleneck_dim or m.head_bottleneck_dim
    row("heads", "iBOT head: prototypes / bottleneck",
        [m.ibot_n_prototypes, ibot_bottleneck] if m.ibot_separate_head else Text("the DINO head"),
        None, [131072, 256])
    row("heads", "last layer", "weight-normalised, trainable gain", None,
        "weight-normalised, trainable gain")
    precision = t.mixed_precision if t.mixed_precision != "auto" else "bf16 on GPU"
    row("heads", "precision", precision, None, "fp16", "the whole step's autocast")
    row("loss", "teacher targets", loss.teacher_targets, None, "sinkhorn_knopp")
    row("loss", "teacher temperature: start / end",
        [loss.teacher_temp_start, loss.teacher_temp], None, [0.04, 0.07])
    row("loss", "teacher temperature warm-up (steps)", loss.teacher_temp_warmup_steps, None,
        30 * DINOV2_ITERS_PER_EPOCH)
    row("loss", "student temperature", loss.student_temp, None, 0.1)
    row("loss", "DINO / iBOT weights", [loss.dino_weight, loss.ibot_weight], None, [1.0, 1.0])
    row("loss", "KoLeo weight (x sum over global crops)", loss.koleo_weight, 0.0, 0.1,
        "the paper replaces KoLeo by KDE")
    row("loss", "KDE weight (x sum over global crops) / κ", [loss.kde_weight, loss.kde_kappa],
        Text("used, κ ≈ 5"), None)
    row("optimiser", "iterations", t.max_steps, P["steps"], 500 * DINOV2_ITERS_PER_EPOCH)
    row("optimiser", "batch per GPU", d.batch_size, P["batch"], 12)
    row("optimiser", "GPUs", gpus if gpus else Text("as launched"), P["gpus"], None)
    row("optimiser", "gradient accumulation", t.grad_accum, P["accum"], 1)
    row("optimiser", "base lr (for a batch of 1024)", t.base_lr, P["lr"], 2e-4)
    row("optimiser", "lr scaling", f"{t.lr_scaling}, batch {t.lr_scaling_batch}", None,
        "sqrt, batch dinov2", "dinov2: per GPU x GPUs; accumulated: x accumulation too")
    if gpus:
        peak = scaled_lr(t.base_lr, lr_batch(d.batch_size, gpus, t.grad_accum,
                                             t.lr_scaling_batch), t.lr_scaling)
        row("optimiser", "peak lr", peak, None, None, f"at {gpus} GPU(s)")
    row("optimiser", "warm-up (share of iterations)", round(t.warmup_steps / t.max_steps, 4),
        None, 0.16, f"{t.warmup_steps} steps; DINOv2's ViT-g: 80 of 500 epochs")
    row("optimiser", "min lr", t.min_lr, None, 1e-6)
    row("optimiser", "weight decay: start / end", [t.weight_decay, t.weight_decay_end], None,
        [0.04, 0.2])
    row("optimiser", "layer-wise lr decay", t.layerwise_decay, None, 1.0)
    row("optimiser", "patch embedding lr x", t.patch_embed_lr_mult, None, 0.2)
    row("optimiser", "AdamW betas", list(t.betas), None, [0.9, 0.999])
    row("optimiser", "gradient clipping (per part)", t.clip_grad, None, 3.0,
        "backbone, DINO head and iBOT head clipped separately")
    row("optimiser", "last layer frozen (steps)", t.freeze_last_layer_steps, None,
        DINOV2_ITERS_PER_EPOCH)
    row("optimiser", "teacher EMA: start / end", [t.teacher_momentum, t.teacher_momentum_end],
        None, [0.994, 1.0])
    return rows


def recipe_summary(rows: list[Row]) -> str:
    return (f"{len(rows)} settings: {sum(r.differs_from_paper for r in rows)} differ from the "
            f"paper, {sum(r.differs_from_dinov2 for r in rows)} from DINOv2's ViT-g/14, the paper "
            f"is silent on {sum(r.paper_silent for r in rows)}")


def recipe_markdown(rows: list[Row], title: str) -> str:
    lines = [f"# Recipe: {title}", "", recipe_summary(rows), "",
             "| | setting | this config | Midnight paper | DINOv2 ViT-g/14 | | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = (r.group, r.setting, show(r.ours), show(r.paper), show(r.dinov2), r.marks(),
                 r.note)
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    if isinstance(value, Text):
        return value.text
    return list(value) if isinstance(value, tuple) else value


def recipe_json(rows: list[Row], title: str) -> str:
    return json.dumps({"config": title, "summary": recipe_summary(rows), "rows": [
        {"group": r.group, "setting": r.setting, "ours": _plain(r.ours),
         "paper": _plain(r.paper), "dinov2": _plain(r.dinov2),
         "differs_from_paper": r.differs_from_paper,
         "differs_from_dinov2": r.differs_from_dinov2, "paper_silent": r.paper_silent,
         "note": r.note} for r in rows]}, indent=1) + "\n"

"""Training configuration: YAML files plus dotted ``key=value`` overrides, checked against
dataclasses so that a misspelt key is an error instead of a silently ignored setting.

    cfg = load_config("examples/tiny-cpu.yaml", ["train.max_steps=20", "data.shards=out/shards"])
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml

from midnight_train.data.config import DataConfig
from midnight_train.method.augment import BLUR_CONVENTIONS, AugmentConfig
from midnight_train.method.models import ModelConfig, create_vit
from midnight_train.method.objective import LossConfig
from midnight_train.method.schedules import LR_BATCH_RULES
from midnight_train.outputs.periodic_eval import EvalConfig
from midnight_train.typed_yaml import ConfigError, build_dataclass, to_plain


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 1000  # optimiser steps
    grad_accum: int = 1  # micro-batches per optimiser step
    base_lr: float = 4e-3
    lr_scaling: str = "sqrt"  # lr = base_lr * sqrt(batch / 1024)
    # the batch of that rule: dinov2 = batch per GPU x GPUs (DINOv2's code, which has no
    # accumulation); accumulated = x grad_accum too (the batch of one optimiser step)
    lr_scaling_batch: str = "dinov2"
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0  # 0 disables clipping
    freeze_last_layer_steps: int = 0
    teacher_momentum: float = 0.992
    teacher_momentum_end: float = 1.0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 1
    # auto: accelerate launch's choice if it made one, else bf16 on GPU, fp32 on CPU; or no /
    # bf16 / fp16 (an explicit value wins over accelerate launch's)
    mixed_precision: str = "auto"
    # FSDP2: student and teacher sharded per ViT block (also `accelerate launch --use_fsdp`)
    fsdp: bool = False
    # processes that share one sharded copy (0: one node's, so several nodes train with hybrid
    # sharding: parameters gathered within a node only, gradients all-reduced across nodes)
    fsdp_shard_size: int = 0
    # the student's blocks stay gathered from forward to backward: 1 all-gather per block per
    # micro-step instead of 4 (2 forwards, 2 backward gathers), for 2 bytes per parameter
    fsdp_keep_gathered: bool = True
    # process-group timeout: covers what one process does alone while the others wait in a
    # collective (rank 0's periodic eval, writing model.pt, removing a replaced run)
    dist_timeout_s: float = 3600.0
    compile: bool = False  # torch.compile each ViT block (midnight_train.loop.kernels)
    deterministic: bool = False  # debugging: repeatable GPU kernels, slower (loop.kernels)
    cpu: bool = False  # force CPU even when a GPU is present
    tensorboard: bool = True
    progress: bool = True


@dataclass
class Config:
    output_dir: str = "out/train"
    resume: str | None = None  # None, "auto" (latest checkpoint in output_dir) or a path
    # Switches of one invocation (saved as false): a fresh run into an output directory that
    # holds an earlier run replaces it; a resumed run may change keys outside RESUME_MAY_CHANGE.
    overwrite: bool = False
    resume_allow_changes: bool = False
    # built by build_config (each may be missing from a YAML file: data only from the command line)
    data: DataConfig | None = None
    augment: AugmentConfig | None = None
    eval: EvalConfig | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _parse_value(text: str) -> Any:
    if text.lstrip().startswith("{") and ".." in text:  # a brace pattern, not a YAML mapping
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` (value parsed as YAML: numbers, null, lists) in a nested dict."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = _parse_value(text)


def build_config(raw: dict) -> Config:
    raw = dict(raw)
    data, augment, evaluation = raw.pop("data", None), raw.pop("augment", None), raw.pop("eval", None)
    cfg = build_dataclass(Config, raw)
    cfg.data = build_dataclass(DataConfig, data, "data")
    cfg.augment = build_dataclass(AugmentConfig, augment, "augment")
    cfg.eval = build_dataclass(EvalConfig, evaluation, "eval")
    check_values(cfg)
    return cfg


def check_values(cfg: Config) -> None:
    """Values that would crash the run later (a division by zero after step 1) or silently train
    nothing (lr <= 0, no prototypes, every loss weight 0) are errors now, naming the key."""
    t, loss, m, d = cfg.train, cfg.loss, cfg.model, cfg.data
    weights = {k: getattr(loss, k) for k in ("dino_weight", "ibot_weight", "kde_weight",
                                              "koleo_weight")}
    tile = d.tile_params().tile_size if d.source_kind() == "slides" else None
    rules = [
        ("train.max_steps", t.max_steps, t.max_steps >= 1, ">= 1"),
        ("train.grad_accum", t.grad_accum, t.grad_accum >= 1, ">= 1"),
        ("train.checkpoint_every", t.checkpoint_every, t.checkpoint_every >= 1, ">= 1"),
        ("train.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints >= 1, ">= 1"),
        ("train.log_every", t.log_every, t.log_every >= 1, ">= 1"),
        ("train.fsdp_shard_size", t.fsdp_shard_size, t.fsdp_shard_size >= 0,
         ">= 0 (0: the processes of one node)"),
        ("train.base_lr", t.base_lr, t.base_lr > 0, "> 0"),
        ("train.min_lr", t.min_lr, t.min_lr >= 0, ">= 0"),
        ("train.warmup_steps", t.warmup_steps, t.warmup_steps >= 0, ">= 0"),
        ("train.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("train.weight_decay_end", t.weight_decay_end, t.weight_decay_end >= 0, ">= 0"),
        ("train.clip_grad", t.clip_grad, t.clip_grad >= 0, ">= 0 (0 disables clipping)"),
        ("train.teacher_momentum", t.teacher_momentum, 0 <= t.teacher_momentum <= 1,
         "in [0, 1]"),
        ("train.teacher_momentum_end", t.teacher_momentum_end,
         0 <= t.teacher_momentum_end <= 1, "in [0, 1]"),
        ("train.lr_scaling", t.lr_scaling, t.lr_scaling in ("sqrt", "linear", "none"),
         "one of sqrt, linear, none"),
        ("train.lr_scaling_batch", t.lr_scaling_batch, t.lr_scaling_batch in LR_BATCH_RULES,
         " or ".join(LR_BATCH_RULES)),
        ("train.mixed_precision", t.mixed_precision,
         t.mixed_precision in ("auto", "no", "bf16", "fp16"), "one of auto, no, bf16, fp16"),
        ("loss.student_temp", loss.student_temp, loss.student_temp > 0, "> 0"),
        ("loss.teacher_temp", loss.teacher_temp, loss.teacher_temp > 0, "> 0"),
        ("loss.teacher_temp_start", loss.teacher_temp_start, loss.teacher_temp_start > 0, "> 0"),
        ("augment.blur_convention", cfg.augment.blur_convention,
         cfg.augment.blur_convention in BLUR_CONVENTIONS, " or ".join(BLUR_CONVENTIONS)),
        *[(f"loss.{k}", v, v >= 0, ">= 0") for k, v in weights.items()],
        ("loss (dino_weight, ibot_weight, kde_weight, koleo_weight)", tuple(weights.values()),
         any(v > 0 for v in weights.values()), "at least one > 0"),
        ("loss.kde_kappa", loss.kde_kappa, loss.kde_kappa > 0, "> 0"),
        ("loss.teacher_targets", loss.teacher_targets,
         loss.teacher_targets in ("sinkhorn_knopp", "centering"), "sinkhorn_knopp or centering"),
        ("loss.sk_iterations", loss.sk_iterations, loss.sk_iterations >= 1, ">= 1"),
        ("loss.center_momentum", loss.center_momentum, 0 <= loss.center_momentum <= 1, "in [0, 1]"),
        ("loss.teacher_temp_warmup_steps", loss.teacher_temp_warmup_steps,
         loss.teacher_temp_warmup_steps >= 0, ">= 0"),
        ("model.head_n_prototypes", m.head_n_prototypes, m.head_n_prototypes > 0, "> 0"),
        ("model.ibot_n_prototypes", m.ibot_n_prototypes, m.ibot_n_prototypes > 0, "> 0"),
        ("model.head_hidden_dim", m.head_hidden_dim, m.head_hidden_dim > 0, "> 0"),
        ("model.head_bottleneck_dim", m.head_bottleneck_dim, m.head_bottleneck_dim > 0, "> 0"),
        ("model.ibot_bottleneck_dim", m.ibot_bottleneck_dim,
         m.ibot_bottleneck_dim is None or m.ibot_bottleneck_dim > 0, "null or > 0"),
        ("model.head_nlayers", m.head_nlayers, m.head_nlayers >= 1, ">= 1"),
        ("model.drop_path_rate", m.drop_path_rate, 0 <= m.drop_path_rate < 1, "in [0, 1)"),
        ("data.mask_ratio_min_max", list(d.mask_ratio_min_max),
         0 <= d.mask_ratio_min_max[0] <= d.mask_ratio_min_max[1] <= 1, "[low, high] in [0, 1]"),
        ("data.mask_sample_probability", d.mask_sample_probability,
         0 <= d.mask_sample_probability <= 1, "in [0, 1]"),
        ("data.mask_max_fraction", d.mask_max_fraction, 0 <= d.mask_max_fraction <= 1,
         "in [0, 1]"),
        ("data.global_crop_size", d.global_crop_size,
         d.global_crop_size > 0 and d.global_crop_size % d.patch_size == 0,
         f"a multiple of data.patch_size ({d.patch_size})"),
        ("data.local_crop_size", d.local_crop_size,
         d.local_crop_size > 0 and d.local_crop_size % d.patch_size == 0
         and d.local_crop_size <= d.global_crop_size,
         f"a multiple of data.patch_size ({d.patch_size}), <= data.global_crop_size"),
        ("data.global_crop_size", d.global_crop_size, tile is None or d.global_crop_size <= tile,
         f"<= data.tiles.tile_size ({tile})"),
        *[(f"data.{k}", list(getattr(d, k)), 0 < getattr(d, k)[0] <= getattr(d, k)[1] <= 1,
           "[low, high] in (0, 1]") for k in ("global_crop_scale", "local_crop_scale")],
    ]
    bad = [f"{key}={value!r} (must be {need})" for key, value, ok, need in rules if not ok]
    if not bad:
        bad = _check_model(m, d.patch_size)
    if bad:
        raise ConfigError(f"invalid value{'s' if len(bad) > 1 else ''}: {'; '.join(bad)}")


def _check_model(m: ModelConfig, patch_size: int) -> list[str]:
    """The backbone built as training builds it (``create_vit``, which refuses what is not a
    VisionTransformer), on the meta device (no memory, a fraction of a second): its patch size
    must be data.patch_size; what timm refuses (an embed dim not divisible by the heads) is
    named here rather than as a traceback later."""
    if not timm.is_model(m.arch):
        return [f"model.arch={m.arch!r} (must be a timm model name such as "
                "vit_small_patch14_dinov2 or vit_giant_patch14_reg4_dinov2)"]
    if not timm.models.is_model_in_modules(m.arch, ["vision_transformer"]):
        return [f"model.arch={m.arch!r} (must be a timm VisionTransformer such as "
                "vit_small_patch14_dinov2 or vit_giant_patch14_reg4_dinov2)"]
    try:
        with torch.device("meta"):
            vit = create_vit(m)
    except Exception as err:  # noqa: BLE001 - any refusal of these arguments is the answer
        return [f"model.arch={m.arch!r} with model.timm_kwargs={m.timm_kwargs!r}: timm cannot "
                f"build it ({type(err).__name__}: {err})"]
    patch = vit.patch_embed.patch_size[0]
    if patch != patch_size:
        return [f"data.patch_size={patch_size} (must be the patch size of {m.arch}: {patch})"]
    return []


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        apply_override(raw, item)
        # A source on the command line (data.shards, data.slides, data.datasets) replaces the
        # config's; shards carry their tile parameters, so data.tiles goes with a slide source.
        key = item.partition("=")[0].strip()
        others = {"data.shards": ("datasets", "slides", "tiles"),
                  "data.slides": ("shards", "datasets"),
                  "data.datasets": ("shards", "slides")}.get(key, ())
        if isinstance(raw.get("data"), dict):
            for other in others:
                raw["data"].pop(other, None)
    return build_config(raw)


def run_config(cfg: Config) -> dict[str, Any]:
    """The config as a run records it (config.yaml, checkpoints): plain values, with the
    switches of one invocation off, so that rerunning a saved config never overwrites a run."""
    return to_plain(dataclasses.replace(cfg, overwrite=False, resume_allow_changes=False))


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(run_config(cfg), sort_keys=False))


# Keys that may differ between a checkpoint's config and the run continuing from it: where the
# output goes, how often it is saved and logged, when it stops (the lr, weight-decay and momentum
# schedules then follow the new train.max_steps), and storage timeouts. Every other key changes
# what is trained (data, model, losses, optimiser, seeds, precision) and is refused unless
# resume_allow_changes=true.
RESUME_MAY_CHANGE = (
    "output_dir", "resume", "overwrite", "resume_allow_changes",
    "train.max_steps", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.tensorboard", "train.progress",
    # how the same model is laid out over the processes (sharded checkpoints load either way)
    "train.fsdp", "train.fsdp_shard_size", "train.fsdp_keep_gathered",
    # how the same step is run and waited for
    "train.dist_timeout_s", "train.compile", "train.deterministic",
    "data.timeout_s", "data.read_retry_s", "data.prefetch_factor", "data.pin_memory",
    "data.mask_cache_dir", "data.tile_cache_mb",  # caches change speed, never pixels
    "data.stage_dir", "data.stage_max_gb",  # where remote slides are staged
    # evaluation during training reads the model, never changes it
    "eval.every", "eval.sets", "eval.methods", "eval.k", "eval.shots", "eval.repeats",
    "eval.batch_size",
)


def _flatten(plain: Any, depth: int = 2, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}`` (sections and their keys; deeper
    values such as ``model.timm_kwargs`` compare as a whole)."""
    if depth and isinstance(plain, dict):
        out: dict[str, Any] = {}
        for k, v in plain.items():
            out.update(_flatten(v, depth - 1, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: plain}


# What a run saved before a key existed did, where that differs from the key's default: such a
# resume is then refused like any other change instead of silently training differently.
SAVED_BEFORE_KEY = {"train.lr_scaling_batch": "accumulated"}


def config_changes(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``key: old -> new`` for every key of ``cfg`` that differs from ``saved`` (a checkpoint's
    recorded config) and is not in ``RESUME_MAY_CHANGE``. Keys the saved config does not know
    (options added since) are not compared."""
    old, new = {**SAVED_BEFORE_KEY, **_flatten(saved)}, _flatten(run_config(cfg))
    return [f"{key}: {old[key]!r} -> {value!r}" for key, value in new.items()
            if key in old and old[key] != value and key not in RESUME_MAY_CHANGE]

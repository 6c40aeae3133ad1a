"""Export the trained teacher (or student) backbone as a model folder in timm's (and the Hub's)
layout, which plain timm loads without midnight:
``timm.create_model("local-dir:OUT_DIR", pretrained=True)``.

OUT_DIR holds ``model.safetensors`` (the backbone, plus iBOT's trained ``mask_token`` [1, dim] as
DINOv2's checkpoints store it: timm's loader drops it, a high-resolution start from the export
takes it; its string metadata also records ``arch``,
``timm_kwargs``, ``mean``/``std``, ``step`` and ``which``, as single-file exports of earlier
versions did), ``config.json`` (timm's: architecture, arguments, input size, normalisation),
``README.md`` (a model card) and ``training_config.json`` (the run's resolved config).

``config.json`` is what timm reads, so it is also what `embed` and `eval` read (architecture,
model arguments, input size, normalisation): an edit there reaches both alike. The metadata is
only read for single-file exports of earlier versions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from midnight_train.loop import checkpoint as ckpt_io
from midnight_train.loop.checkpoint import CheckpointError
from midnight_train.method.models import MASK_TOKEN, ModelConfig, export_timm_kwargs
from midnight_train.outputs.model_card import model_card, timm_config
from midnight_train.typed_yaml import build_dataclass

PREFIX = "backbone.vit."
WEIGHTS = "model.safetensors"
EXPORT_FILES = (WEIGHTS, "config.json", "README.md", "training_config.json")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


class ExportError(ValueError):
    """An export folder (or file) that cannot be used as it is; the message says why."""


def load_checkpoint(path: str | Path, skipped: list[str] | None = None) -> tuple[Path, dict]:
    """A checkpoint directory's state, or a training output directory's newest readable one
    (the reasons for skipping damaged newer ones are appended to ``skipped``)."""
    path = Path(path)
    if ckpt_io.checkpoint_step(path) is not None:
        return path, ckpt_io.load(path)
    candidates = ckpt_io.list_checkpoints(path)[::-1]
    if not candidates:
        raise CheckpointError(f"no checkpoint in {path} (a checkpoint directory or a training "
                              f"output directory with checkpoints/step_*/model.pt)")
    reasons: list[str] = []
    found = ckpt_io.load_newest(candidates, ckpt_io.load, reasons)
    if skipped is not None:
        skipped.extend(reasons)
    if found is None:
        raise CheckpointError(f"no readable checkpoint in {path}: {'; '.join(reasons)}")
    return found


def check_img_size(img_size: int, patch: int, what: str = "--img-size") -> None:
    """A ViT input size must be a positive multiple of its patch size."""
    if img_size < patch or img_size % patch:
        lower = max(patch, img_size // patch * patch)
        raise ValueError(f"{what} {img_size}: not a multiple of the model's patch size {patch} "
                         f"(e.g. {lower} or {lower + patch})")


def export_backbone(checkpoint: str | Path, out: str | Path, *, which: str = "teacher",
                    img_size: int | None = None, skipped: list[str] | None = None,
                    kept: list[str] | None = None) -> Path:
    """Write the ``which`` backbone of a checkpoint as a model folder ``out`` and return it.
    ``img_size`` resamples the position embedding to another input size (e.g. 392 after
    high-res training). ``checkpoint`` as in ``load_checkpoint``. ``out`` is new, empty or an
    earlier export (replaced; other files in it are kept and appended to ``kept``)."""
    check_export_folder(out)
    _, state = load_checkpoint(checkpoint, skipped)
    model_cfg = build_dataclass(ModelConfig, state["config"]["model"], "model")
    weights = {k[len(PREFIX):]: v.float().contiguous() for k, v in state[which].items()
               if k.startswith(PREFIX)}
    token = state[which].get(f"backbone.{MASK_TOKEN}")
    if token is not None:  # absent only in checkpoints of the earliest versions
        weights[MASK_TOKEN] = token.float().reshape(1, -1).contiguous()
    if img_size is not None:  # checked before the folder is touched, from the weights' patch
        check_img_size(img_size, int(weights["patch_embed.proj.weight"].shape[-1]))
    if img_size is not None and img_size != model_cfg.img_size:
        vit = timm.create_model(model_cfg.arch, pretrained=False,
                                **{**export_timm_kwargs(model_cfg), "img_size": img_size})
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        patch = vit.patch_embed.patch_size[0]
        weights["pos_embed"] = resample_abs_pos_embed(
            weights["pos_embed"], new_size=vit.patch_embed.grid_size,
            old_size=(model_cfg.img_size // patch,) * 2, num_prefix_tokens=prefix)
        model_cfg.img_size = img_size
    augment = state["config"].get("augment") or {}
    # an old checkpoint without these values was trained with ImageNet's statistics
    return save_model_folder(out, weights, model_cfg.arch, export_timm_kwargs(model_cfg),
                             list(augment.get("mean", (0.485, 0.456, 0.406))),
                             list(augment.get("std", (0.229, 0.224, 0.225))),
                             which=which, step=int(state["step"]), config=state["config"],
                             kept=kept)


def save_model_folder(out: str | Path, weights: dict[str, torch.Tensor], arch: str,
                      timm_kwargs: dict, mean: list[float], std: list[float], *, which: str,
                      step: int | None, config: dict, kept: list[str] | None = None) -> Path:
    """The folder: weights (checked to load strictly into the timm model), timm's config.json,
    the model card and the training config."""
    others = check_export_folder(out)
    if kept is not None:
        kept.extend(others)
    model = timm.create_model(arch, pretrained=False, **timm_kwargs)
    # strict: every key fits, or the export is refused here
    model.load_state_dict({k: v for k, v in weights.items() if k != MASK_TOKEN})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "midnight-timm", "arch": arch, "timm_kwargs": json.dumps(timm_kwargs),
            "mean": json.dumps(mean), "std": json.dumps(std), "which": which,
            "step": "" if step is None else str(step)}
    save_file(weights, str(out / WEIGHTS), metadata=meta)
    img_size = int(timm_kwargs["img_size"])
    model_args = {k: v for k, v in timm_kwargs.items() if k not in ("img_size", "num_classes")}
    (out / "config.json").write_text(json.dumps(timm_config(
        arch, model_args, model.num_features, img_size, mean, std), indent=2) + "\n")
    (out / "README.md").write_text(model_card(
        name=out.name, arch=arch, img_size=img_size, num_features=model.num_features, mean=mean,
        std=std, which=which, step=step, config=config))
    (out / "training_config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
    return out


def check_export_folder(out: str | Path) -> list[str]:
    """Refuse an ``out`` that would mix an export with unrelated files; return the names of
    the other files of an earlier export folder (kept when it is replaced)."""
    out = Path(out)
    if out.suffix == ".safetensors":
        raise ValueError(f"{out}: an export is a folder now (model.safetensors, config.json, "
                         f"README.md): give a directory name")
    if not out.exists():
        return []
    if not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder; give a new or empty folder")
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
    if others and not (out / WEIGHTS).is_file():
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ValueError(f"{out}: not empty and not an earlier export ({shown}); give a new or "
                         f"empty folder")
    return others


def weights_file(path: str | Path) -> Path:
    """The safetensors file of an export folder (or the file itself, for older exports)."""
    path = Path(path)
    return path / WEIGHTS if path.is_dir() else path


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(weights_file(path)), framework="pt") as f:
        return dict(f.metadata() or {})


@dataclass(frozen=True)
class ExportSpec:
    """How to rebuild and feed an exported backbone: timm's architecture and model arguments,
    the input size, normalisation and resize interpolation."""

    arch: str
    model_args: dict
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"


def _numbers(value: object, where: str, positive: bool = False) -> tuple[float, ...]:
    ok = (isinstance(value, list) and len(value) == 3
          and all(isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not positive)
                  for v in value))
    if not ok:
        raise ExportError(f"{where} must be 3 {'positive ' if positive else ''}numbers "
                          f"(got {value!r})")
    return tuple(float(v) for v in value)


def read_export_spec(path: str | Path) -> ExportSpec:
    """An export folder's ``config.json`` read as timm reads it (``model_args.img_size`` is the
    input size of a fixed-size model), checked; for an older single-file export, its
    metadata. Raises ExportError on anything missing, malformed or beyond what embedding can
    follow (a centre crop smaller than the tile)."""
    path = Path(path)
    if not path.is_dir():
        try:
            meta = read_metadata(path)
        except Exception as err:  # safetensors' own error types; any means "not an export"
            raise ExportError(f"{path}: not an export folder nor a .safetensors export "
                              f"({type(err).__name__}: {err})") from err
        if "arch" not in meta:
            raise ExportError(f"{path}: no midnight export metadata (arch, timm_kwargs)")
        kwargs = json.loads(meta["timm_kwargs"])
        return ExportSpec(meta["arch"], kwargs, int(kwargs["img_size"]),
                          tuple(json.loads(meta.get("mean", "[0.485, 0.456, 0.406]"))),
                          tuple(json.loads(meta.get("std", "[0.229, 0.224, 0.225]"))))
    file = path / "config.json"
    try:
        cfg = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise ExportError(f"{file}: missing; an export folder needs it (re-export)") from err
    except ValueError as err:
        raise ExportError(f"{file}: not valid JSON ({err}); fix it or re-export") from err
    pre = cfg.get("pretrained_cfg") if isinstance(cfg, dict) else None
    args = cfg.get("model_args", {}) if isinstance(cfg, dict) else None
    if not isinstance(pre, dict) or not isinstance(args, dict) or not isinstance(cfg.get("architecture"), str):
        raise ExportError(f"{file}: needs 'architecture', 'model_args' and 'pretrained_cfg' "
                          f"as timm writes them; fix it or re-export")
    size = args.get("img_size") if pre.get("fixed_input_size", False) else None
    if size is None:
        shape = pre.get("input_size")
        if not (isinstance(shape, list) and len(shape) == 3 and shape[1] == shape[2]):
            raise ExportError(f"{file}: pretrained_cfg.input_size must be [3, N, N] (got {shape!r})")
        size = shape[2]
    if not isinstance(size, int) or size < 1:
        raise ExportError(f"{file}: the input size must be a positive whole number (got {size!r})")
    interpolation = pre.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise ExportError(f"{file}: interpolation {interpolation!r}: embedding resizes with "
                          f"one of {', '.join(INTERPOLATIONS)}")
    if pre.get("crop_pct", 1.0) != 1.0 or pre.get("crop_mode", "center") != "center":
        raise ExportError(f"{file}: crop_pct {pre.get('crop_pct')!r}, crop_mode "
                          f"{pre.get('crop_mode')!r}: embedding resizes the whole tile "
                          f"(crop_pct 1.0, crop_mode center)")
    return ExportSpec(cfg["architecture"], {**args, "img_size": size}, size,
                      _numbers(pre.get("mean"), f"{file}: pretrained_cfg.mean"),
                      _numbers(pre.get("std"), f"{file}: pretrained_cfg.std", positive=True),
                      interpolation)


def load_exported(path: str | Path, *, dynamic_img_size: bool = True,
                  spec: ExportSpec | None = None) -> torch.nn.Module:
    """The exported backbone (a folder, or an older single file) as a timm model in eval mode,
    built as ``spec`` (default: ``read_export_spec``) says. ExportError when the weights do
    not fit it."""
    spec = spec or read_export_spec(path)
    try:
        model = timm.create_model(spec.arch, pretrained=False,
                                  **{**spec.model_args, "dynamic_img_size": dynamic_img_size})
    except (RuntimeError, TypeError, ValueError) as err:
        raise ExportError(f"{path}: timm cannot build {spec.arch} with the model arguments "
                          f"of its config ({err})") from err
    try:
        weights = load_file(str(weights_file(path)))
        weights.pop(MASK_TOKEN, None)  # iBOT's, not the backbone's
        model.load_state_dict(weights)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ExportError(f"{path}: the weights do not fit the model its config describes "
                          f"({first} …); fix config.json or re-export") from err
    return model.eval()

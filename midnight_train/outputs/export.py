"""Export the trained teacher (or student) backbone as a model folder in timm's (and the Hub's)
layout, which plain timm loads without midnight:
``timm.create_model("local-dir:OUT_DIR", pretrained=True)``.

OUT_DIR holds ``model.safetensors`` (the backbone, plus iBOT's trained ``mask_token`` [1, dim] as
DINOv2's checkpoints store it: timm's loader drops it, a high-resolution start from the export
takes it; its string metadata also records ``arch``,
``timm_kwargs``, ``mean``/``std``, ``step`` and ``which``, as single-file exports of earlier
versions did), ``config.json`` (timm's: architecture, arguments, input size, normalisation),
``README.md`` (a model card) and ``training_config.json`` (the run's resolved config).
"""

from __future__ import annotations

import json
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


WEIGHTS = "model.safetensors"


def export_backbone(checkpoint: str | Path, out: str | Path, *, which: str = "teacher",
                    img_size: int | None = None, skipped: list[str] | None = None) -> Path:
    """Write the ``which`` backbone of a checkpoint as a model folder ``out`` and return it.
    ``img_size`` resamples the position embedding to another input size (e.g. 392 after
    high-res training). ``checkpoint`` as in ``load_checkpoint``."""
    _, state = load_checkpoint(checkpoint, skipped)
    model_cfg = build_dataclass(ModelConfig, state["config"]["model"], "model")
    weights = {k[len(PREFIX):]: v.float().contiguous() for k, v in state[which].items()
               if k.startswith(PREFIX)}
    token = state[which].get(f"backbone.{MASK_TOKEN}")
    if token is not None:  # absent only in checkpoints of the earliest versions
        weights[MASK_TOKEN] = token.float().reshape(1, -1).contiguous()
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
                             which=which, step=int(state["step"]), config=state["config"])


def save_model_folder(out: str | Path, weights: dict[str, torch.Tensor], arch: str,
                      timm_kwargs: dict, mean: list[float], std: list[float], *, which: str,
                      step: int | None, config: dict) -> Path:
    """The folder: weights (checked to load strictly into the timm model), timm's config.json,
    the model card and the training config."""
    model = timm.create_model(arch, pretrained=False, **timm_kwargs)
    # strict: every key fits, or the export is refused here
    model.load_state_dict({k: v for k, v in weights.items() if k != MASK_TOKEN})
    out = Path(out)
    if out.suffix == ".safetensors":
        raise ValueError(f"{out}: an export is a folder now (model.safetensors, config.json, "
                         f"README.md): give a directory name")
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


def weights_file(path: str | Path) -> Path:
    """The safetensors file of an export folder (or the file itself, for older exports)."""
    path = Path(path)
    return path / WEIGHTS if path.is_dir() else path


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(weights_file(path)), framework="pt") as f:
        return dict(f.metadata() or {})


def load_exported(path: str | Path, *, dynamic_img_size: bool = True) -> torch.nn.Module:
    """The exported backbone (a folder, or an older single file) as a timm model in eval mode."""
    meta = read_metadata(path)
    if "arch" not in meta:
        raise ValueError(f"{path}: no midnight export metadata (arch, timm_kwargs)")
    model = timm.create_model(meta["arch"], pretrained=False, dynamic_img_size=dynamic_img_size,
                              **json.loads(meta["timm_kwargs"]))
    weights = load_file(str(weights_file(path)))
    weights.pop(MASK_TOKEN, None)  # iBOT's, not the backbone's
    model.load_state_dict(weights)
    return model.eval()

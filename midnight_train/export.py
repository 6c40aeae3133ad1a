"""Export the trained teacher (or student) backbone as a safetensors state dict that plain timm
loads: ``timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).load_state_dict(...)``.

The file's string metadata records ``arch`` and the ``timm_kwargs`` (img_size, init_values, ...),
and the input normalisation, so ``load_exported`` (and ``midnight-train embed``) can rebuild it.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from midnight_train import checkpoint as ckpt_io
from midnight_train.checkpoint import CheckpointError
from midnight_train.config import build_dataclass
from midnight_train.models import ModelConfig, backbone_metadata, export_timm_kwargs

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


def export_backbone(checkpoint: str | Path, out: str | Path, *, which: str = "teacher",
                    img_size: int | None = None, skipped: list[str] | None = None) -> Path:
    """Write the ``which`` backbone of a checkpoint to ``out`` (.safetensors). ``img_size``
    resamples the position embedding to another input size (e.g. 392 after high-res training).
    ``checkpoint`` as in ``load_checkpoint``."""
    _, state = load_checkpoint(checkpoint, skipped)
    model_cfg = build_dataclass(ModelConfig, state["config"]["model"], "model")
    weights = {k[len(PREFIX):]: v.float().contiguous() for k, v in state[which].items()
               if k.startswith(PREFIX)}
    if img_size is not None and img_size != model_cfg.img_size:
        vit = timm.create_model(model_cfg.arch, pretrained=False,
                                **{**export_timm_kwargs(model_cfg), "img_size": img_size})
        prefix = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        patch = vit.patch_embed.patch_size[0]
        weights["pos_embed"] = resample_abs_pos_embed(
            weights["pos_embed"], new_size=vit.patch_embed.grid_size,
            old_size=(model_cfg.img_size // patch,) * 2, num_prefix_tokens=prefix)
        model_cfg.img_size = img_size
    meta = backbone_metadata(model_cfg)
    augment = state["config"].get("augment") or {}
    meta["mean"] = json.dumps(list(augment.get("mean", (0.485, 0.456, 0.406))))
    meta["std"] = json.dumps(list(augment.get("std", (0.229, 0.224, 0.225))))
    meta["step"] = str(state["step"])
    meta["which"] = which
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata=meta)
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_exported(path: str | Path, *, dynamic_img_size: bool = True) -> torch.nn.Module:
    """The exported backbone as a timm model in eval mode."""
    meta = read_metadata(path)
    if "arch" not in meta:
        raise ValueError(f"{path}: no midnight export metadata (arch, timm_kwargs)")
    model = timm.create_model(meta["arch"], pretrained=False, dynamic_img_size=dynamic_img_size,
                              **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()

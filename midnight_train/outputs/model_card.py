"""What travels with an exported model folder besides its weights: timm's `config.json` (so that
`timm.create_model("local-dir:DIR", pretrained=True)` and the Hub's `hf-hub:` prefix rebuild it
with the right input size and normalisation) and a model card (`README.md`)."""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from typing import Any


def timm_config(arch: str, model_args: dict[str, Any], num_features: int, img_size: int,
                mean: list[float], std: list[float]) -> dict[str, Any]:
    """timm's model-folder config: the architecture and its arguments, no classifier, and the
    preprocessing that `timm.data.resolve_data_config` reports."""
    return {
        "architecture": arch,
        "num_classes": 0,
        "num_features": num_features,
        "global_pool": "token",
        "model_args": {**model_args, "img_size": img_size, "num_classes": 0},
        "pretrained_cfg": {
            "input_size": [3, img_size, img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": list(mean),
            "std": list(std),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }


def training_data_summary(source: Any) -> str:
    """A few lines on the shards a run trained on, from the shard builder's manifests (tiles,
    slides, tiles per µm/px); says so when they cannot be read."""
    import fsspec

    sources = [source] if isinstance(source, str) else list(source or [])
    tiles, slides, per_mpp = 0, set(), Counter()
    lines = []
    for item in sources:
        try:
            fs, path = fsspec.core.url_to_fs(str(item))
            manifests = sorted(fs.glob(posixpath.join(path, "manifests", "*.json")))
            for m in manifests:
                with fs.open(m, "rb") as f:
                    manifest = json.load(f)
                tiles += int(manifest.get("samples", 0))
                for s in manifest.get("slides", []):
                    if s.get("status", "ok") == "ok":
                        slides.add(s.get("slide_id"))
                    for mpp, n in (s.get("written") or {}).items():
                        per_mpp[mpp] += int(n)
            if not manifests:
                lines.append(f"- `{item}`: no shard-builder manifests (counts unknown)")
        except Exception as exn:  # the card is still written; it says what it could not read
            lines.append(f"- `{item}`: manifests not readable here ({type(exn).__name__})")
    if tiles:
        mpps = ", ".join(f"{k} µm/px: {v:,}" for k, v in sorted(per_mpp.items(), key=lambda kv: float(kv[0])))
        lines.insert(0, f"- {tiles:,} tiles from {len(slides):,} slides ({mpps})")
    return "\n".join(lines) or "- unknown (no shard source recorded)"


def model_card(*, name: str, arch: str, img_size: int, num_features: int, mean: list[float],
               std: list[float], which: str, step: int | None, config: dict[str, Any]) -> str:
    """README.md of an exported folder: what the model is, how it was trained, how to use it."""
    data = config.get("data") or {}
    train = config.get("train") or {}
    loss = config.get("loss") or {}
    source = data.get("shards") or [d.get("shards") for d in data.get("datasets") or []]
    return f"""---
library_name: timm
license: other  # fill in the licence of your weights and data
tags: [pathology, dinov2, midnight, image-feature-extraction]
---
# {name}

A {arch} backbone ({which} weights, step {step if step is not None else "unknown"}) trained
with DINOv2 as modified by the Midnight recipe (DINO + iBOT + KDE regulariser, HED colour
augmentation) by `midnight-train`.

## Use: CLS+Mean embeddings

```python
import timm, torch

model = timm.create_model("local-dir:{name}", pretrained=True).eval()  # or "hf-hub:ORG/{name}"
config = timm.data.resolve_data_config(model=model)  # {img_size} px, mean {list(mean)}, std {list(std)}
transform = timm.data.create_transform(**config)
with torch.no_grad():
    tokens = model.forward_features(transform(image).unsqueeze(0))
    embedding = torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(1)], dim=-1)
```

The embedding is the CLS token concatenated with the mean of the patch tokens of the final
norm output ({2 * num_features} values), as the Midnight paper evaluates it.

## Preprocessing

Tiles resized to {img_size} × {img_size} px (bicubic), scaled to [0, 1], normalised with
mean = {list(mean)} and std = {list(std)}.

## Training

- Data (shards):
{training_data_summary(source)}
- Crops: 2 global × {data.get("global_crop_size")} px, {data.get("n_local_crops")} local × {data.get("local_crop_size")} px
- Steps: {train.get("max_steps")} optimiser steps, batch {data.get("batch_size")} per process,
  gradient accumulation {train.get("grad_accum")}, base lr {train.get("base_lr")}
- Losses: DINO weight {loss.get("dino_weight")}, iBOT weight {loss.get("ibot_weight")}, KDE weight
  {loss.get("kde_weight")}

The resolved training configuration is in `training_config.json`.

## Licence

Fill in the licence under which you share these weights, and the terms of the slides they were
trained on.
"""

"""Evaluation during training: every `eval.every` optimiser steps, the current teacher backbone
embeds small labelled sets (CLS+Mean) on the main process and `evaluate` scores them; the
results join that step's metrics as `eval/<set>/<method>` (balanced accuracy).

It never changes training: no global random generator is drawn from (the probes take their own
seeds), the backbone's train/eval mode is restored, and the images are decoded once and kept as
uint8 (so later evaluations cost forward passes only)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from midnight_train.data.crops import decode_tile
from midnight_train.outputs.embed import cls_mean_embedding, iter_encoded
from midnight_train.outputs.evaluate import METHODS, check_labels, evaluate, load_labelled


@dataclass
class EvalConfig:
    """The `eval:` section. `sets`: [{name, train, test}], each path a folder of class folders
    or a CSV (`path,label`) of images (embeddings would not follow the model)."""

    every: int = 0  # optimiser steps between evaluations; 0: none
    sets: list[dict[str, Any]] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["knn", "linear"])
    k: int = 20
    shots: int = 10
    repeats: int = 5
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError("eval.every must be ≥ 0 (0: no evaluation during training)")
        unknown = set(self.methods) - set(METHODS)
        if unknown:
            raise ValueError(f"eval.methods: unknown {sorted(unknown)}; choose from {METHODS}")
        for s in self.sets:
            if set(s) - {"name", "train", "test"} or not {"name", "train", "test"} <= set(s):
                raise ValueError(f"eval.sets entry {s!r}: needs exactly name, train and test")
        if self.every and not self.sets:
            raise ValueError("eval.every is set but eval.sets is empty")
        for key in ("k", "shots", "repeats", "batch_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"eval.{key} must be a whole number ≥ 1 (got {value!r})")


class PeriodicEval:
    """Labelled sets loaded once; `__call__(backbone)` → {"eval/<set>/<method>": accuracy}."""

    def __init__(self, cfg: EvalConfig, img_size: int, mean: list[float], std: list[float]) -> None:
        self.cfg, self.size = cfg, img_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.sets: list[tuple[str, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = []
        for s in cfg.sets:
            self.sets.append((str(s["name"]), self._load(s["train"]), self._load(s["test"])))
            try:  # label mistakes found before training, not at the first evaluation
                check_labels(self.sets[-1][1][1], self.sets[-1][2][1], lambda line, name=s["name"]:
                             print(f"warning: eval set {name}: {line}", file=sys.stderr))
            except ValueError as err:
                raise ValueError(f"eval set {s['name']}: {err}") from None

    def due(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    def _load(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images [N, size, size, 3] and labels; an unreadable image is an error here."""
        labelled = load_labelled(path)
        if labelled.paths is None:
            raise ValueError(f"eval set {path}: give images (class folders or CSV), not embeddings")
        problems: list[str] = []
        images = []
        for key, data, _ in iter_encoded(labelled.paths, problems.append, slides=False):
            try:
                img = decode_tile(data)
            except Exception as exn:
                raise ValueError(f"eval set {path}: {key} is not a readable image ({exn})") from exn
            if img.size != (self.size, self.size):
                img = img.resize((self.size, self.size), resample=3)  # bicubic, as `embed`
            images.append(np.asarray(img, dtype=np.uint8))
        if problems:
            raise ValueError(f"eval set {path}: {problems[0]}")
        return np.stack(images), labelled.labels

    @torch.no_grad()
    def _embed(self, backbone: torch.nn.Module, images: np.ndarray) -> np.ndarray:
        device = next(backbone.parameters()).device
        out = []
        for start in range(0, len(images), self.cfg.batch_size):
            x = torch.from_numpy(images[start:start + self.cfg.batch_size]).permute(0, 3, 1, 2)
            x = ((x.float() / 255 - self.mean) / self.std).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(cls_mean_embedding(backbone, x).float().cpu().numpy())
        return np.concatenate(out)

    def __call__(self, backbone: torch.nn.Module) -> dict[str, float]:
        """Scores of `backbone` (a timm ViT: `forward_features`) on every set."""
        was_training = backbone.training
        backbone.eval()
        try:
            metrics: dict[str, float] = {}
            for name, (train_x, train_y), (test_x, test_y) in self.sets:
                results = evaluate(self._embed(backbone, train_x), train_y,
                                   self._embed(backbone, test_x), test_y,
                                   methods=tuple(self.cfg.methods), k=self.cfg.k,
                                   shots=self.cfg.shots, repeats=self.cfg.repeats)
                metrics.update({f"eval/{name}/{m}": r["balanced_accuracy"] for m, r in results.items()})
            return metrics
        finally:
            backbone.train(was_training)

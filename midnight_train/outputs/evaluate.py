"""Judging frozen embeddings on labelled tiles, as the paper does (balanced accuracy):

- `knn`: DINOv2's kNN classifier: cosine similarity, the k = 20 nearest training tiles vote with
  weight exp(similarity / 0.07);
- `linear`: logistic regression on standardised embeddings, its regularisation picked on a
  stratified validation split of the training set, then refit on all of it;
- `fewshot`: the same probe trained on n tiles per class (e.g. PCam 10-shot), repeated over
  seeds: mean ± std.

Everything here takes embeddings (numpy arrays) and labels; `load_labelled` turns a folder with
one sub-folder per class, a CSV (`path,label`) or an `.npz` (`embeddings`, `labels`, `keys`)
into them."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff"}
METHODS = ("knn", "linear", "fewshot")


@dataclass
class Labelled:
    """Tiles with class labels: `paths` (images still to embed) or `x` (embeddings)."""

    labels: np.ndarray
    paths: list[str] | None = None
    x: np.ndarray | None = None


def load_labelled(path: str | Path) -> Labelled:
    """A folder of class folders, a CSV with `path,label` columns (paths relative to the CSV),
    or an .npz with `embeddings` and `labels`."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "labels" not in data or "embeddings" not in data:
                raise ValueError(f"{path}: an .npz for evaluation needs `embeddings` and `labels`")
            return Labelled(labels=data["labels"].astype(str), x=data["embeddings"].astype(np.float32))
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"path", "label"} <= set(rows[0]):
            raise ValueError(f"{path}: a CSV for evaluation needs `path` and `label` columns")
        labels_of: dict[str, set[str]] = {}
        for r in rows:
            labels_of.setdefault(r["path"], set()).add(r["label"])
        clashes = sorted(p for p, ls in labels_of.items() if len(ls) > 1)
        if clashes:
            raise ValueError(f"{path}: {len(clashes)} image(s) listed under more than one label "
                             f"(e.g. {clashes[0]}: {', '.join(sorted(labels_of[clashes[0]]))}); "
                             f"give each image one label")
        return Labelled(labels=np.array([r["label"] for r in rows]),
                        paths=[str(path.parent / r["path"]) for r in rows])
    if path.is_dir():
        paths, labels = [], []
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            for image in sorted(folder.rglob("*")):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(str(image))
                    labels.append(folder.name)
        if not paths:
            raise ValueError(f"{path}: no images in class sub-folders ({path}/CLASS/*.png …)")
        return Labelled(labels=np.array(labels), paths=paths)
    raise ValueError(f"{path}: not a folder of class folders, a .csv or an .npz")


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over the classes present in `truth` of the recall of that class."""
    classes = np.unique(truth)
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in classes]))


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
    """Labels by temperature-weighted votes of the k most cosine-similar training tiles."""
    classes, train_idx = np.unique(train_y, return_inverse=True)
    a = train_x / np.maximum(np.linalg.norm(train_x, axis=1, keepdims=True), 1e-12)
    k = min(k, len(a))
    out = np.empty(len(test_x), dtype=classes.dtype)
    for start in range(0, len(test_x), chunk):
        b = test_x[start:start + chunk]
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        sim = b @ a.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        weights = np.exp(np.take_along_axis(sim, top, 1) / temperature)
        votes = np.zeros((len(b), len(classes)))
        np.add.at(votes, (np.arange(len(b))[:, None], train_idx[top]), weights)
        out[start:start + len(b)] = classes[votes.argmax(1)]
    return out


def _probe(c: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))


def linear_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, seed: int = 0,
                   cs: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0),
                   val_fraction: float = 0.2) -> tuple[np.ndarray, float]:
    """(predicted labels, chosen C): C picked by balanced accuracy on a stratified validation
    split of the training set, then the probe refit on the whole training set."""
    from sklearn.model_selection import train_test_split

    best_c = cs[len(cs) // 2]
    counts = np.unique(train_y, return_counts=True)[1]
    if len(cs) > 1 and counts.min() >= 2 and len(train_y) * val_fraction >= len(counts):
        fit_x, val_x, fit_y, val_y = train_test_split(train_x, train_y, test_size=val_fraction,
                                                      stratify=train_y, random_state=seed)
        scores = [balanced_accuracy(val_y, _probe(c, seed).fit(fit_x, fit_y).predict(val_x))
                  for c in cs]
        best_c = cs[int(np.argmax(scores))]
    return _probe(best_c, seed).fit(train_x, train_y).predict(test_x), best_c


def few_shot(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
             shots: int = 10, repeats: int = 10, seed: int = 0) -> list[float]:
    """Balanced accuracies of probes (C = 1) trained on `shots` random tiles per class, one per
    repeat; repeat r draws with seed (seed, r), so the list is reproducible."""
    classes = np.unique(train_y)
    scores = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        pick = np.concatenate([rng.choice(np.flatnonzero(train_y == c),
                                          min(shots, int((train_y == c).sum())), replace=False)
                               for c in classes])
        predicted = _probe(1.0, seed).fit(train_x[pick], train_y[pick]).predict(test_x)
        scores.append(balanced_accuracy(test_y, predicted))
    return scores


def check_labels(train_y: np.ndarray, test_y: np.ndarray,
                 warn: Callable[[str], None] | None = None) -> None:
    """ValueError for one training class or test classes none of which were trained; `warn`
    hears of test classes only some of which are missing from training."""
    if len(np.unique(train_y)) < 2:
        raise ValueError("evaluation needs at least two classes in the training set "
                         f"(got {', '.join(map(str, np.unique(train_y)))})")
    missing = sorted(set(np.unique(test_y)) - set(np.unique(train_y)))
    if len(missing) == len(np.unique(test_y)):
        raise ValueError(f"no test class is a training class (test: {', '.join(map(str, missing))}; "
                         f"training: {', '.join(map(str, np.unique(train_y)))})")
    if missing and warn is not None:
        n = int(np.isin(test_y, missing).sum())
        warn(f"test classes not in the training set: {', '.join(map(str, missing))} ({n} test "
             f"tiles): never predicted, they count as recall 0 in every balanced accuracy")


def evaluate(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
             methods: tuple[str, ...] = METHODS, k: int = 20, shots: int = 10, repeats: int = 10,
             seed: int = 0, warn: Callable[[str], None] | None = None) -> dict[str, dict]:
    """{method: {"balanced_accuracy": …, …}} for the chosen methods. ValueError for an option
    out of range, an empty set, one training class or test classes none of which were
    trained; `warn` hears of test classes only some of which are missing from training."""
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown evaluation methods {sorted(unknown)}; choose from {METHODS}")
    for name, value in (("k", k), ("shots", shots), ("repeats", repeats)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"--{name} {value}: must be a whole number ≥ 1")
    for name, x in (("training", train_x), ("test", test_x)):
        if len(x) == 0:
            raise ValueError(f"no {name} tiles to evaluate on")
    check_labels(train_y, test_y, warn)
    results: dict[str, dict] = {}
    if "knn" in methods:
        results["knn"] = {"balanced_accuracy": balanced_accuracy(
            test_y, knn_predict(train_x, train_y, test_x, k=k)), "k": min(k, len(train_x))}
    if "linear" in methods:
        predicted, c = linear_predict(train_x, train_y, test_x, seed=seed)
        results["linear"] = {"balanced_accuracy": balanced_accuracy(test_y, predicted), "C": c}
    if "fewshot" in methods:
        scores = few_shot(train_x, train_y, test_x, test_y, shots=shots, repeats=repeats, seed=seed)
        classes, counts = np.unique(train_y, return_counts=True)
        per_class = {str(c): min(shots, int(n)) for c, n in zip(classes, counts)}
        fewer = {c: n for c, n in per_class.items() if n < shots}
        if fewer and warn is not None:
            warn(f"fewshot: fewer than {shots} training tiles in "
                 + ", ".join(f"{c} ({n})" for c, n in fewer.items()) + ": all of them are used")
        results["fewshot"] = {"balanced_accuracy": float(np.mean(scores)),
                              "std": float(np.std(scores)), "shots": shots,
                              "shots_per_class": per_class, "repeats": repeats}
    for r in results.values():
        if not all(math.isfinite(v) for v in r.values() if isinstance(v, float)):
            raise ValueError(f"evaluation gave a non-finite result {r}")
    return results


def format_results(results: dict[str, dict], title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"{'method':<10} {'balanced accuracy':>18}")
    for method, r in results.items():
        spread = f" ± {r['std']:.3f}" if "std" in r else ""
        lines.append(f"{method:<10} {r['balanced_accuracy']:>12.3f}{spread}")
    return "\n".join(lines)


def embed_labelled(sets: list[Labelled], embed: Callable[[list[str]], tuple[list[str], np.ndarray]]
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(embeddings, labels) per set; image sets go through `embed(paths) -> (kept paths, x)`
    (unreadable images are dropped with their labels)."""
    out = []
    for s in sets:
        if s.x is not None:
            out.append((s.x, s.labels))
            continue
        kept, x = embed(s.paths or [])
        index = {p: i for i, p in enumerate(s.paths or [])}
        out.append((x, s.labels[[index[p] for p in kept]]))
    return out

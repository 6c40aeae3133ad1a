"""Evaluation during training: scores land in metrics.jsonl as eval/<set>/<method>, the training
itself is unchanged by it, and exact resume still holds with it on."""

from __future__ import annotations

import json

import pytest
import shardkit
import torch
from train_fakes import make_trainer, tiny_config

from midnight_train.loop import checkpoint
from midnight_train.loop.step import TIMING_METRICS
from midnight_train.outputs.periodic_eval import EvalConfig


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, cmu_slide):
    """Real tissue at two magnifications, as class folders (train and test)."""
    return shardkit.magnification_classes(tmp_path_factory.mktemp("labelled"), cmu_slide, 10, 6,
                                          size=112, seed=5)


def config(out, labelled, every):
    cfg = tiny_config(out, train={"max_steps": 4, "checkpoint_every": 2})
    cfg.eval = EvalConfig(every=every, sets=[{"name": "mag", "train": str(labelled / "train"),
                                              "test": str(labelled / "test")}],
                          methods=["knn", "linear", "fewshot"], shots=3, repeats=2)
    return cfg


def test_eval_metrics_logged_without_changing_training(tmp_path, labelled):
    make_trainer(config(tmp_path / "with", labelled, every=2)).fit()
    make_trainer(config(tmp_path / "without", labelled, every=0)).fit()
    with_eval, without = read_metrics(tmp_path / "with"), read_metrics(tmp_path / "without")
    scored = [r for r in with_eval if "eval/mag/knn" in r]
    assert [r["step"] for r in scored] == [2, 4]
    assert all(0 <= r[f"eval/mag/{m}"] <= 1 for r in scored for m in ("knn", "linear", "fewshot"))
    strip = [{k: v for k, v in r.items() if not k.startswith("eval/") and k not in TIMING_METRICS}
             for r in with_eval]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in without]
    a = checkpoint.load(checkpoint.latest(tmp_path / "with"))
    b = checkpoint.load(checkpoint.latest(tmp_path / "without"))
    assert all(torch.equal(v, b["teacher"][k]) for k, v in a["teacher"].items())


def test_exact_resume_with_eval_on(tmp_path, labelled):
    make_trainer(config(tmp_path / "full", labelled, every=2)).fit()
    cut = config(tmp_path / "cut", labelled, every=2)
    make_trainer(cut).fit(stop_after=2)
    cut.resume = "auto"
    make_trainer(cut).fit()
    drop = TIMING_METRICS
    full = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "full")]
    resumed = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "cut")]
    assert resumed == full and "eval/mag/linear" in resumed[-1]


def test_eval_config_is_checked():
    with pytest.raises(ValueError, match="svm"):
        EvalConfig(every=1, sets=[{"name": "a", "train": "x", "test": "y"}], methods=["svm"])
    with pytest.raises(ValueError, match="eval.sets is empty"):
        EvalConfig(every=5)
    for key, value in (("k", 0), ("shots", 0), ("repeats", -1), ("batch_size", 0)):
        with pytest.raises(ValueError, match=f"eval.{key} must be"):
            EvalConfig(**{key: value})


def test_eval_sets_whose_classes_cannot_be_scored_are_refused_before_training(tmp_path, labelled):
    import shutil

    from midnight_train.outputs.periodic_eval import PeriodicEval

    test = tmp_path / "test"
    shutil.copytree(labelled / "test" / "fine", test / "other")  # a class the training set lacks
    cfg = EvalConfig(every=1, sets=[{"name": "mag", "train": str(labelled / "train"), "test": str(test)}])
    with pytest.raises(ValueError, match="eval set mag: no test class is a training class"):
        PeriodicEval(cfg, 28, [0.5] * 3, [0.5] * 3)

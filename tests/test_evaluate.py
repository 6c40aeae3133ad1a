"""Evaluation of frozen embeddings: known answers on synthetic sets, an independent kNN
reference, repeatable few-shot draws, and the `eval` command on real tissue tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shardkit
from click.testing import CliRunner

from midnight_train.cli import main
from midnight_train.outputs.evaluate import balanced_accuracy, evaluate, few_shot, knn_predict


def blobs(n_per_class: int, dim: int = 16, spread: float = 0.3, seed: int = 0):
    """Three well separated Gaussian clusters (the same orthogonal centres, 3 apart, for every
    seed; `seed` draws the points): every method must be exact."""
    centres = np.linalg.qr(np.random.default_rng(99).normal(size=(dim, 3)))[0].T * 3
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centres])
    y = np.repeat(np.array(["a", "b", "c"]), n_per_class)
    return x.astype(np.float32), y


def test_separable_set_is_solved_and_random_labels_are_at_chance():
    train_x, train_y = blobs(40, seed=0)
    test_x, test_y = blobs(30, seed=1)
    results = evaluate(train_x, train_y, test_x, test_y, shots=5, repeats=4)
    assert {m: r["balanced_accuracy"] for m, r in results.items()} == {"knn": 1.0, "linear": 1.0, "fewshot": 1.0}
    shuffled = np.random.default_rng(2).permutation(train_y)
    chance = evaluate(train_x, shuffled, test_x, test_y, methods=("knn", "linear"))
    assert all(r["balanced_accuracy"] < 0.6 for r in chance.values())


def test_balanced_accuracy_weights_classes_equally():
    truth = np.array(["a"] * 90 + ["b"] * 10)
    assert balanced_accuracy(truth, np.array(["a"] * 100)) == 0.5  # plain accuracy would say 0.9
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    t, p = rng.choice(list("xyz"), 200), rng.choice(list("xyz"), 200)
    assert balanced_accuracy(t, p) == pytest.approx(balanced_accuracy_score(t, p))


def test_knn_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    train_x, test_x = rng.normal(size=(50, 8)), rng.normal(size=(20, 8))
    train_y = rng.choice(["p", "q", "r"], 50)
    got = knn_predict(train_x, train_y, test_x, k=7, temperature=0.07, chunk=6)
    for i, q in enumerate(test_x):
        sims = [q @ t / np.linalg.norm(q) / np.linalg.norm(t) for t in train_x]
        votes: dict[str, float] = {}
        for j in np.argsort(sims)[::-1][:7]:
            votes[train_y[j]] = votes.get(train_y[j], 0.0) + np.exp(sims[j] / 0.07)
        assert got[i] == max(votes, key=votes.get)


def test_few_shot_is_repeatable_per_seed():
    train_x, train_y = blobs(40, spread=2.5, seed=4)
    test_x, test_y = blobs(30, spread=2.5, seed=5)
    a = few_shot(train_x, train_y, test_x, test_y, shots=3, repeats=5, seed=7)
    assert a == few_shot(train_x, train_y, test_x, test_y, shots=3, repeats=5, seed=7)
    assert a != few_shot(train_x, train_y, test_x, test_y, shots=3, repeats=5, seed=8)
    assert len(set(a)) > 1  # different draws per repeat


def test_eval_command_on_real_tiles(tmp_path, cmu_slide, tiny_export):
    """Which magnification was a tissue tile cut at: class folders of real CMU tiles at full
    resolution and 4x coarser; also the same embeddings given as .npz."""
    shardkit.magnification_classes(tmp_path, cmu_slide, 32, 16, size=128, seed=3)
    (tmp_path / "test" / "fine" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "results.json"
    result = CliRunner().invoke(main, ["eval", str(tiny_export), "--train", str(tmp_path / "train"),
                                       "--test", str(tmp_path / "test"), "--shots", "4",
                                       "--repeats", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "64 training / 32 test tiles, 2 classes" in result.output and "broken.png" in result.output
    results = json.loads(out.read_text())
    assert set(results) == {"knn", "linear", "fewshot"}
    assert all(0.0 <= r["balanced_accuracy"] <= 1.0 for r in results.values())
    assert results["fewshot"]["repeats"] == 3 and results["fewshot"]["std"] >= 0
    rng = np.random.default_rng(0)  # precomputed embeddings take the same path
    np.savez(tmp_path / "tr.npz", embeddings=rng.normal(size=(20, 4)), labels=np.repeat(["u", "v"], 10))
    np.savez(tmp_path / "te.npz", embeddings=rng.normal(size=(6, 4)), labels=np.repeat(["u", "v"], 3))
    npz = CliRunner().invoke(main, ["eval", str(tiny_export), "--train", str(tmp_path / "tr.npz"),
                                    "--test", str(tmp_path / "te.npz"), "--methods", "knn", "--json", "-"])
    assert npz.exit_code == 0, npz.output
    assert "20 training / 6 test tiles" in npz.output and '"knn"' in npz.output
    bad = CliRunner().invoke(main, ["eval", str(tiny_export), "--train", str(tmp_path / "tr.npz"),
                                    "--test", str(tmp_path / "te.npz"), "--methods", "svm"])
    assert bad.exit_code == 2 and "svm" in bad.output


def _npz_sets(tmp_path, train_labels, test_labels):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "tr.npz", embeddings=rng.normal(size=(len(train_labels), 4)), labels=np.array(train_labels))
    np.savez(tmp_path / "te.npz", embeddings=rng.normal(size=(len(test_labels), 4)), labels=np.array(test_labels))
    return ["--train", str(tmp_path / "tr.npz"), "--test", str(tmp_path / "te.npz")]


@pytest.mark.parametrize("option", [["--k", "0"], ["--k", "-5"], ["--shots", "0"], ["--repeats", "0"],
                                    ["--batch-size", "0"], ["--workers", "-1"]])
def test_eval_options_out_of_range_are_refused(tmp_path, tiny_export, option):
    sets = _npz_sets(tmp_path, ["u", "v"] * 5, ["u", "v"] * 2)
    result = CliRunner().invoke(main, ["eval", str(tiny_export), *sets, *option, "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 2 and option[0] in result.output and not (tmp_path / "r.json").exists()


def test_eval_checks_where_its_json_goes_and_what_its_weights_are_before_the_work(tmp_path, tiny_export):
    sets = _npz_sets(tmp_path, ["u", "v"] * 5, ["u", "v"] * 2)
    result = CliRunner().invoke(main, ["eval", str(tiny_export), *sets, "--json", str(tmp_path / "no" / "r.json")])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "set.csv").write_text("path,label\na.png,u\n")
    (tmp_path / "weights.bin").write_bytes(b"not safetensors")
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "weights.bin"), "--train", str(tmp_path / "set.csv"),
                                       "--test", str(tmp_path / "set.csv")])
    assert result.exit_code == 1 and "not an export folder nor a .safetensors export" in result.output


def test_evaluate_refuses_what_would_give_a_meaningless_number():
    x, y = blobs(5)
    for kwargs in ({"k": 0}, {"k": -5}, {"shots": 0}, {"repeats": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            evaluate(x, y, x, y, **kwargs)
    with pytest.raises(ValueError, match="no test class is a training class"):
        evaluate(x, y, x, np.full(len(y), "other"), methods=("knn",))
    with pytest.raises(ValueError, match="no test tiles"):
        evaluate(x, y, x[:0], y[:0], methods=("knn",))


def test_eval_warns_of_untrained_test_classes_and_of_short_few_shot_classes(tmp_path, tiny_export):
    sets = _npz_sets(tmp_path, ["u"] * 8 + ["v"], ["u", "v", "w", "w"])
    result = CliRunner().invoke(main, ["eval", str(tiny_export), *sets, "--shots", "4", "--repeats", "2",
                                       "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "test classes not in the training set: w (2 test tiles)" in result.output
    assert "fewer than 4 training tiles in v (1)" in result.output
    fewshot = json.loads((tmp_path / "r.json").read_text())["fewshot"]
    assert fewshot["shots"] == 4 and fewshot["shots_per_class"] == {"u": 4, "v": 1}


def test_eval_refuses_one_image_under_two_labels_and_names_unreadable_sets(tmp_path, tiny_export):
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(b"not a png")
    (tmp_path / "two.csv").write_text("path,label\na.png,x\nb.png,y\na.png,y\n")
    (tmp_path / "ok.csv").write_text("path,label\na.png,x\nb.png,y\n")
    result = CliRunner().invoke(main, ["eval", str(tiny_export), "--train", str(tmp_path / "two.csv"),
                                       "--test", str(tmp_path / "ok.csv")])
    assert result.exit_code == 2 and "1 image(s) listed under more than one label (e.g. a.png: x, y)" in result.output
    result = CliRunner().invoke(main, ["eval", str(tiny_export), "--train", str(tmp_path / "ok.csv"),
                                       "--test", str(tmp_path / "ok.csv"), "--workers", "0"])
    assert result.exit_code == 1 and "--train: none of its 2 images could be read" in result.output
    assert "two classes" not in result.output

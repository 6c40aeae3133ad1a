"""Runs are never mixed and checkpoints are safe: a fresh run refuses an earlier run's output
directory, a resume refuses config changes, damaged checkpoints are skipped, crafted ones refused
(tiny ViT, in-memory data stand-in, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from train_fakes import make_trainer, tiny_config  # noqa: E402

from midnight_train.cli import main  # noqa: E402
from midnight_train.loop import checkpoint  # noqa: E402
from midnight_train.loop.checkpoint import CheckpointError, latest, list_checkpoints  # noqa: E402
from midnight_train.loop.errors import RunError  # noqa: E402
from midnight_train.loop.step import TIMING_METRICS  # noqa: E402
from midnight_train.outputs.export import export_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = str(ROOT / "examples" / "tiny-cpu.yaml")


def metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in rows]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load(path)["teacher"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fit(out: Path, *, stop_after: int | None = None, resume: str | None = None,
        overwrite: bool = False, resume_allow_changes: bool = False, **train) -> None:
    cfg = tiny_config(out, train=train)
    cfg.resume, cfg.overwrite, cfg.resume_allow_changes = resume, overwrite, resume_allow_changes
    make_trainer(cfg).fit(stop_after=stop_after)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-step run (checkpoint every step) to compare continuations with."""
    out = tmp_path_factory.mktemp("reference")
    fit(out, max_steps=4, checkpoint_every=1, keep_checkpoints=4)
    return out


# ----------------------------------------------------------------------------- issue item 1


def test_fresh_run_refuses_an_earlier_run_and_overwrite_replaces_it(tmp_path):
    run = tmp_path / "R"
    fit(run, max_steps=2)
    before = (latest(run) / "model.pt").stat().st_mtime_ns
    with pytest.raises(RunError, match=r"not empty .*resume=auto.*overwrite=true"):
        fit(run, max_steps=2, base_lr=0.5)
    assert (latest(run) / "model.pt").stat().st_mtime_ns == before
    assert "base_lr: 0.001" in (run / "config.yaml").read_text()

    (run / "notes.txt").write_text("mine")  # not a run file: left alone by overwrite
    fit(run, max_steps=2, base_lr=0.5, overwrite=True)
    fit(tmp_path / "new", max_steps=2, base_lr=0.5)
    assert same_weights(weights(latest(run)), weights(latest(tmp_path / "new")))
    assert metrics(run) == metrics(tmp_path / "new")
    saved = (run / "config.yaml").read_text()
    assert "base_lr: 0.5" in saved and "overwrite: false" in saved  # a rerun never overwrites
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_from_an_earlier_checkpoint_refuses_later_ones(tmp_path, reference):
    run = tmp_path / "R"
    fit(run, max_steps=4, checkpoint_every=2)
    step2 = run / "checkpoints" / "step_00000002"
    with pytest.raises(RunError, match="step_00000004"):
        fit(run, max_steps=4, checkpoint_every=2, resume=str(step2))
    fit(run, max_steps=4, checkpoint_every=2, resume=str(step2), overwrite=True)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    assert metrics(run) == metrics(reference)


# ----------------------------------------------------------------------------- issue item 2


def test_resume_refuses_config_changes_and_names_them(tmp_path):
    run = tmp_path / "R"
    fit(run, max_steps=2)
    with pytest.raises(RunError) as refused:
        fit(run, max_steps=2, base_lr=0.5, seed=3, resume="auto")
    message = str(refused.value)
    assert "train.base_lr: 0.001 -> 0.5" in message and "train.seed: 0 -> 3" in message
    assert "train.max_steps" in message and "train.checkpoint_every" in message  # allowed list
    assert "resume_allow_changes=true" in message
    assert "base_lr: 0.001" in (run / "config.yaml").read_text()  # nothing rewritten

    fit(run, max_steps=3, resume="auto")  # allowed: train longer
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    fit(run, max_steps=4, base_lr=0.5, resume="auto", resume_allow_changes=True)
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert checkpoint.load(latest(run))["config"]["train"]["base_lr"] == 0.5


# ----------------------------------------------------------------------------- issue item 8


class RunsAShellCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_is_refused_not_run(tmp_path):
    run = tmp_path / "R"
    fit(run, max_steps=1, checkpoint_every=1)
    path = latest(run)
    marker = tmp_path / "pwned"
    state = checkpoint.load(path)
    state["config"]["note"] = RunsAShellCommand(marker)
    torch.save(state, path / "model.pt")

    with pytest.raises(CheckpointError, match="refused"):
        export_backbone(run, tmp_path / "model")
    with pytest.raises(RunError, match="refused"):
        fit(run, max_steps=2, resume="auto")
    assert not marker.exists()


def test_rank_files_of_the_earlier_format_still_resume_exactly(tmp_path, reference):
    """Earlier rank files held numpy's RNG state as an array: allowed, nothing else is."""
    run = tmp_path / "R"
    fit(run, max_steps=4, checkpoint_every=2, stop_after=2)
    file = checkpoint.rank_file(latest(run), 0)
    state = checkpoint.load_rank(latest(run), 0)
    key = np.asarray(state["rng"]["numpy"]["state"]["key"], np.uint32)
    state["rng"]["numpy"] = ("MT19937", key, state["rng"]["numpy"]["state"]["pos"], 0, 0.0)
    torch.save(state, file)
    assert isinstance(checkpoint.load_rank(latest(run), 0)["rng"]["numpy"][1], np.ndarray)
    fit(run, max_steps=4, checkpoint_every=2, resume="auto")
    assert metrics(run) == metrics(reference)


def test_a_checkpoint_from_another_kind_of_device_resumes_with_a_warning(tmp_path, reference,
                                                                         capsys):
    """A CUDA generator's state is 16 bytes, a CPU one's 5056: a checkpoint written on a GPU
    resumed on the CPU (or the reverse) goes on, its augmentation generator reseeded."""
    run = tmp_path / "R"
    fit(run, max_steps=4, checkpoint_every=2, stop_after=2)
    file = checkpoint.rank_file(latest(run), 0)
    state = checkpoint.load_rank(latest(run), 0)
    assert state["augment_rng"].numel() == 5056  # the CPU generator's
    state["augment_rng"] = torch.arange(16, dtype=torch.uint8)  # as a CUDA generator's
    torch.save(state, file)
    fit(run, max_steps=4, checkpoint_every=2, resume="auto")
    err = capsys.readouterr().err
    assert "augmentation generator state (16 bytes) is not a cpu generator's" in err
    assert "Reseeded from the step" in err
    rows, ref = metrics(run), metrics(reference)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[:2] == ref[:2] and rows[2] != ref[2]  # continued, but not bit-for-bit


# ----------------------------------------------------------------------------- damaged state


def damage_model(path: Path) -> None:
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[: len(data) // 2])


def damage_rank(path: Path) -> None:
    checkpoint.rank_file(path, 0).write_bytes(b"\x80\x02garbage")


def remove_rank(path: Path) -> None:
    checkpoint.rank_file(path, 0).unlink()


@pytest.mark.parametrize("damage, reason", [(damage_model, "model.pt: unreadable"),
                                            (damage_rank, "rank_00000.pt: unreadable"),
                                            (remove_rank, "rank_00000.pt: missing")])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, reference, capsys, damage, reason):
    run = tmp_path / "R"
    fit(run, max_steps=4, checkpoint_every=1, keep_checkpoints=4, stop_after=3)
    damage(run / "checkpoints" / "step_00000003")
    capsys.readouterr()
    fit(run, max_steps=4, checkpoint_every=1, keep_checkpoints=4, resume="auto")
    said = capsys.readouterr()
    assert f"skipped damaged checkpoint: {run}/checkpoints/step_00000003/{reason}" in said.err
    assert "processes, this run has" not in said.err
    assert f"resumed from {run}/checkpoints/step_00000002 (step 2)" in said.out
    assert metrics(run) == metrics(reference)  # the same run as if nothing had happened
    for step in (3, 4):  # the damaged checkpoint was replaced by a good one
        name = f"step_{step:08d}"
        assert same_weights(weights(run / "checkpoints" / name),
                            weights(reference / "checkpoints" / name))


def test_no_readable_checkpoint_names_every_one(tmp_path):
    run = tmp_path / "R"
    fit(run, max_steps=2, checkpoint_every=1)
    for path in list_checkpoints(run):
        damage_model(path)
    with pytest.raises(RunError, match=r"no usable checkpoint: .*step_00000002.*step_00000001"):
        fit(run, max_steps=2, checkpoint_every=1, resume="auto")


def test_resume_tolerates_a_torn_last_metrics_line(tmp_path, reference, capsys):
    run = tmp_path / "R"
    fit(run, max_steps=4, checkpoint_every=2, stop_after=2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed during a write
    fit(run, max_steps=4, checkpoint_every=2, resume="auto")
    assert "torn last line" in capsys.readouterr().err
    assert metrics(run) == metrics(reference)


def test_export_takes_the_newest_readable_checkpoint_and_says_so(tmp_path, reference):
    run = tmp_path / "R"
    fit(run, max_steps=2, checkpoint_every=1)
    damage_model(latest(run))
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["export", str(run), str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped damaged checkpoint" in result.output and "step_00000002" in result.output
    from midnight_train.outputs.export import read_metadata

    assert read_metadata(out)["step"] == "1"


def test_export_does_not_import_the_training_stack():
    code = "import sys, midnight_train.outputs.export; print('accelerate' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
    assert done.stdout.strip() == "False"


# ----------------------------------------------------------------------------- one clear line


def cli_fit(*args: str):
    return CliRunner().invoke(main, ["fit", TINY_YAML, "train.tensorboard=false",
                                     "data.shards=/nowhere", *args])


def test_user_errors_are_one_line_without_traceback(tmp_path):
    bad_arch = cli_fit(f"output_dir={tmp_path / 'a'}", "model.arch=vit_no_such_model")
    assert bad_arch.exit_code == 2 and "model.arch='vit_no_such_model'" in bad_arch.output
    bad_path = cli_fit(f"output_dir={tmp_path / 'b'}", f"resume={tmp_path / 'bad'}")
    assert bad_path.exit_code == 1 and isinstance(bad_path.exception, SystemExit)
    assert f"{tmp_path / 'bad'}: not a checkpoint directory" in bad_path.output

    run = tmp_path / "R"  # a checkpoint of another model size (embed_dim 32, not 64)
    fit(run, max_steps=1, checkpoint_every=1)
    refused = cli_fit(f"output_dir={run}", "resume=auto")
    assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit)
    assert "model.timm_kwargs: {'embed_dim': 32" in refused.output
    forced = cli_fit(f"output_dir={run}", "resume=auto", "resume_allow_changes=true")
    assert forced.exit_code == 1 and isinstance(forced.exception, SystemExit)
    assert "does not fit the model of this config" in forced.output
    assert "size mismatch" in forced.output

    debug = cli_fit(f"output_dir={run}", "resume=auto", "--debug")
    assert isinstance(debug.exception, RunError)  # --debug: the exception and its traceback


def test_fit_help_names_the_switches():
    text = CliRunner().invoke(main, ["fit", "-h"]).output
    for switch in ("resume=auto", "overwrite=true", "resume_allow_changes=true", "--debug"):
        assert switch in text


def test_a_loader_workers_error_is_one_line_and_fit_exits(tmp_path, cmu_slide):
    """A slide that cannot give any asked µm/px fails inside a DataLoader worker: `fit` says why
    in one line (not torch's re-raised worker traceback) and exits; the workers, which block
    SIGTERM for preemption, must not keep the process alive (this hung before)."""
    tiny = str(Path(__file__).resolve().parents[1] / "examples" / "tiny-cpu.yaml")
    for workers, said in ((1, "a data loader worker failed: midnight_train.data.config.DataError: "),
                          (0, "Error: ")):
        done = subprocess.run(
            [sys.executable, "-m", "midnight_train", "fit", tiny, f"data.slides={cmu_slide}",
             f"data.num_workers={workers}", "data.tiles.mpps=[0.1]", "train.tensorboard=false",
             f"output_dir={tmp_path / f'run{workers}'}"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"{said}dataset 'default': all 1 slides" in done.stderr, done.stderr
        assert "0.1 µm/px" in done.stderr and "Traceback" not in done.stderr

"""The run folder (``output_dir``): a run never mixes with another. A fresh run refuses a folder
that is not empty (``overwrite=true`` replaces the earlier run's files); ``resume`` refuses
config changes other than ``config.RESUME_MAY_CHANGE`` (``resume_allow_changes=true`` accepts
them); the run files are ``config.yaml`` (the resolved config) and ``metrics.jsonl`` (one line
per logged step, cut back to the step a resumed run continues from)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from midnight_train.config import RESUME_MAY_CHANGE, Config, config_changes, save_config
from midnight_train.data.config import DataConfig
from midnight_train.loop import checkpoint
from midnight_train.loop.checkpoint import CHECKPOINT_DIR, list_checkpoints
from midnight_train.loop.errors import RunError
from midnight_train.method.recipe import recipe_json, recipe_markdown, recipe_rows

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
RECIPE_FILES = ("recipe.md", "recipe.json")  # method.recipe's table for this run
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE, *RECIPE_FILES, TENSORBOARD_DIR)


class RunDir:
    """One run's folder as seen by one process; ``is_main`` writes, ``barrier`` synchronises
    the processes around what changes the folder."""

    def __init__(self, path: str | Path, *, is_main: bool, barrier: Callable[[], None]):
        self.path = Path(path)
        self.is_main, self.barrier = is_main, barrier

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINT_DIR

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    def say(self, message: str, *, warning: bool = False) -> None:
        """One line from the main process (stdout, or stderr as a warning)."""
        if self.is_main:
            print(f"warning: {message}" if warning else message,
                  file=sys.stderr if warning else sys.stdout, flush=True)

    def check_config(self, cfg: Config, path: Path, state: dict, precision: str,
                     precision_source: str) -> None:
        """The config-change guard of a resumed run."""
        changes = config_changes(state["config"], cfg)
        before = state.get("precision")
        if before is not None and before != precision:  # mixed_precision=auto resolved otherwise
            changes.append(f"precision: {before!r} -> {precision!r} ({precision_source})")
        if not changes:
            return
        listed = "; ".join(changes)
        if not cfg.resume_allow_changes:
            raise RunError(
                f"resume from {path}: the config differs from the checkpoint's in what it trains: "
                f"{listed}. Only these keys may change on resume: {', '.join(RESUME_MAY_CHANGE)}. "
                f"Restore the checkpoint's values, train into a new output_dir, or add "
                f"resume_allow_changes=true to continue with the new values")
        self.say(f"resume_allow_changes=true: continuing {path} with {listed}", warning=True)

    def claim(self, cfg: Config, resumed: Path | None, step: int) -> None:
        """Refuse to mix this run with another in the folder, or (overwrite=true) remove the
        other's files. Another run is: anything there, for a fresh start or a continuation from
        elsewhere; checkpoints after ``resumed``, for a continuation from one of the folder's.
        resume=auto continues the newest readable checkpoint (any later one is a damaged one it
        skipped, replaced when the run gets there) or starts over in a run without any."""
        out = self.path
        if not out.is_dir() or cfg.resume == "auto":
            return
        in_place = (resumed is not None
                    and resumed.resolve().parent == self.checkpoints.resolve())
        if in_place:
            stale = [p for p in list_checkpoints(out)
                     if (checkpoint.checkpoint_step(p) or 0) > step]
            what = f"holds checkpoints after step {step}"
        else:
            stale = sorted(out.iterdir())
            what = "is not empty"
        if not stale:
            return
        names = ", ".join(p.name for p in stale[:6]) + (" ..." if len(stale) > 6 else "")
        if not cfg.overwrite:
            how = "a new run" if resumed is None else f"continuing from {resumed}"
            raise RunError(
                f"output_dir {out} {what} ({names}): {how} would mix with the run there. "
                f"Continue that run with resume=auto, "
                f"{'discard them' if in_place else 'replace it'} with overwrite=true, or choose "
                f"another output_dir")
        self.barrier()  # every process has looked before anything goes
        if self.is_main:
            removed = []
            for p in stale:
                if not in_place and p.name not in RUN_FILES:
                    continue  # not a run's file: left alone
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p.name)
            if removed:
                print(f"overwrite=true: removed {', '.join(removed)} from {out}", flush=True)
        self.barrier()

    def _metrics_until(self, step: int) -> list[str]:
        """metrics.jsonl lines up to ``step`` (later ones are redone). A torn last line (a kill
        during a write) is dropped; damage elsewhere is an error naming the line."""
        if not self.metrics.exists():
            return []
        lines = self.metrics.read_text().splitlines()
        keep = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    self.say(f"{self.metrics}: dropped a torn last line ({line[:40]!r}...)",
                             warning=True)
                    continue
                raise RunError(f"{self.metrics}, line {number}: not JSON ({line[:60]!r}); "
                               f"repair or delete that line, then resume again") from None
            if row.get("step", 0) <= step:
                keep.append(line + "\n")
        return keep

    def write_run_files(self, cfg: Config, resumed: Path | None, step: int,
                        processes: int = 1) -> None:
        """config.yaml, the recipe beside its sources (at the run's process count), and
        metrics.jsonl cut back to the step continued from."""
        keep = self._metrics_until(step) if resumed is not None else []
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.path / CONFIG_FILE)
        if isinstance(cfg.data, DataConfig):  # (the trainer's tests run on a stand-in)
            rows = recipe_rows(cfg, gpus=processes)
            (self.path / RECIPE_FILES[0]).write_text(recipe_markdown(rows, str(self.path)))
            (self.path / RECIPE_FILES[1]).write_text(recipe_json(rows, str(self.path)))
        if self.metrics.exists():
            self.metrics.write_text("".join(keep))

    def append_metrics(self, row: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")

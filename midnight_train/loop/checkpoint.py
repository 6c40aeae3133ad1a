"""Training checkpoints on disk: naming, listing, atomic saving and safe loading.

Layout: ``OUTPUT/checkpoints/step_XXXXXXXX/`` holds ``model.pt`` (student, teacher, optimiser,
loss state, step, the run's config) and one ``rank_XXXXX.pt`` per process (RNG states, colour
augmentation generator, data-stream position). A run with sharded networks (FSDP) writes
sharded checkpoints: each process also writes ``shard_XXXXX.pt``, its slices of the student,
teacher and optimiser tensors (each split along its first dimension, in process order), and
``model.pt`` records ``sharded`` (the number of shards) and holds everything else; ``load``
joins the slices, so a sharded checkpoint reads like any other (export, a resume with another
number of processes), and ``load(..., join=False)`` + ``load_shard`` give one process its own.

A checkpoint is written to a hidden ``.tmp_step_…`` directory and renamed into place, so a kill
during a save leaves the previous checkpoints intact and never shows a half-written one under a
``step_…`` name.

Loading never unpickles code: files are read with ``torch.load(weights_only=True)``, which
accepts tensors and plain Python values only (a crafted file is refused, not run). Everything
this module writes is of that kind; the numpy RNG state goes in as plain ints. Rank files of
earlier versions held the numpy state as an array: only the numpy array constructor is
allowed in addition, for those files.

Depends on torch only (no Accelerate), so exporting a model does not need the training stack.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.pt"
MODEL_KEYS = ("step", "world_size", "config", "student", "teacher", "objective", "optimizer")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a checkpoint directory (``step_XXXXXXXX`` with a ``model.pt``), else None."""
    path = Path(path)
    if not path.name.startswith("step_") or not (path / MODEL_FILE).is_file():
        return None
    try:
        return int(path.name[len("step_"):])
    except ValueError:
        return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints of a training output directory, oldest first (hidden temporary directories
    are never listed). Listed means complete on disk, not necessarily readable: see ``load``."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def latest(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def rank_file(path: str | Path, rank: int) -> Path:
    return Path(path) / f"rank_{rank:05d}.pt"


def shard_file(path: str | Path, rank: int) -> Path:
    return Path(path) / f"shard_{rank:05d}.pt"


SHARDED_PARTS = ("student", "teacher", "optimizer")  # what a shard file holds slices of


# ----------------------------------------------------------------------------- saving


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _nothing() -> None:
    pass


def save(output_dir: str | Path, step: int, *, rank: int, rank_state: dict[str, Any],
         model: dict[str, Any] | None, keep: int, barrier: Callable[[], None] = _nothing,
         shard: dict[str, Any] | None = None, shard_index: int | None = None) -> Path:
    """Write the checkpoint of ``step``; every process calls it with its own ``rank_state``
    (and ``shard``, its slices, when the networks are sharded: slice ``shard_index``, by
    default ``rank``; with hybrid sharding only the first group's processes pass theirs, the
    other groups hold the same slices), process 0 also with ``model``
    (the ``MODEL_KEYS`` but ``step``), and publishes it. ``barrier`` synchronises the processes
    (none needed in a single process). A checkpoint already under the same name (left by a run
    continued from an earlier step) is replaced. Then only the newest ``keep`` checkpoints are
    kept."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_{final.name}"
    main = rank == 0
    if main:
        if model is None:
            raise ValueError("process 0 writes model.pt: pass model")
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    _write(rank_state, rank_file(tmp, rank))
    if shard is not None:
        _write(shard, shard_file(tmp, rank if shard_index is None else shard_index))
    if main:
        _write({"step": step, **model}, tmp / MODEL_FILE)
    barrier()
    if main:
        _fsync_dir(tmp)
        if final.exists():
            replaced = root / f".replaced_{final.name}"
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
            os.replace(tmp, final)
            shutil.rmtree(replaced)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


# ----------------------------------------------------------------------------- loading


def _legacy_numpy_globals() -> list:
    """What an earlier version's rank file needs beyond plain values: the numpy array of the
    MT19937 state (array constructor, ndarray, dtype). None of these runs arbitrary code."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _read(path: Path, what: str, mmap: bool = False) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what})")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for truncated or foreign files
        text = str(err)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if "Weights only load failed" in text:
            code = [line for line in lines if "GLOBAL" in line or "reduce" in line]
            if code:  # the pickle names a function or class to call: never done here
                raise CheckpointError(
                    f"{path}: refused: it holds Python objects that could run code when loaded "
                    f"({code[0][:200]}). Checkpoints of this tool never do; do not use a file "
                    f"of unknown origin") from None
            after = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            lines = after[:1] if after and after[0].strip() else lines
        reason = lines[0].split(". ")[0][:200] if lines else type(err).__name__
        raise CheckpointError(f"{path}: unreadable, damaged or truncated ({reason})") from None


def load(path: str | Path, *, join: bool = True) -> dict[str, Any]:
    """``model.pt`` of a checkpoint directory: ``MODEL_KEYS`` (state dicts and plain values).
    A sharded checkpoint's slices are joined into whole tensors (``join=False``: left out)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (OUTPUT/checkpoints/step_*/)")
    state = _read(path / MODEL_FILE, "the model state")
    missing = [k for k in MODEL_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path / MODEL_FILE}: not a midnight-train checkpoint (no "
                              f"{', '.join(missing)})")
    if join and state.get("sharded"):
        _join_shards(path, state)
    return state


def load_shard(path: str | Path, rank: int, mmap: bool = False) -> dict[str, Any]:
    """``shard_XXXXX.pt``: process ``rank``'s slices of a sharded checkpoint (``mmap``: read
    from the file only where a tensor is used)."""
    file = shard_file(path, rank)
    state = _read(file, f"process {rank}'s slices of the model and optimiser", mmap)
    missing = [k for k in SHARDED_PARTS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file}: not a midnight-train shard file (no {', '.join(missing)})")
    return state


def _join_shards(path: Path, state: dict[str, Any]) -> None:
    """Whole tensors from the slices of every shard file, in ``state`` (in place): the
    student's and teacher's entries, and the optimiser's per-parameter state."""
    shards = [load_shard(path, rank) for rank in range(int(state["sharded"]))]
    for part in ("student", "teacher"):
        for name in shards[0][part]:
            state[part][name] = torch.cat([s[part][name] for s in shards])
    optimizer_state = state["optimizer"]["state"]
    for index, slots in shards[0]["optimizer"].items():
        for slot in slots:
            optimizer_state.setdefault(index, {})[slot] = torch.cat(
                [s["optimizer"][index][slot] for s in shards])
    state["sharded"] = 0  # whole now


def _rows(pieces: list[torch.Tensor], start: int, end: int) -> torch.Tensor:
    """Rows [start, end) of the concatenation of ``pieces``, copying only those rows."""
    out, offset = [], 0
    for piece in pieces:
        n = piece.shape[0]
        lo, hi = max(start - offset, 0), min(end - offset, n)
        if lo < hi:
            out.append(piece[lo:hi])
        offset += n
    if not out:
        return pieces[0][:0].clone()
    return torch.cat(out) if len(out) > 1 else out[0].clone()


def load_resliced(path: str | Path, n_shards: int, rank: int, world_size: int) -> dict[str, Any]:
    """Process ``rank``'s slices for ``world_size`` slices per copy, as a shard file of that
    layout would hold them, from a checkpoint saved as ``n_shards`` slices: each shard file is
    memory-mapped and only the rows this process needs are read (``torch.chunk`` along the first
    dimension, as FSDP2 cuts), so no process ever holds the whole model."""
    shards = [load_shard(path, i, mmap=True) for i in range(n_shards)]

    def mine(pieces: list[torch.Tensor]) -> torch.Tensor:
        total = sum(p.shape[0] for p in pieces)
        size = -(-total // world_size) if total else 0
        start, end = min(rank * size, total), min((rank + 1) * size, total)
        return _rows(pieces, start, end)

    out: dict[str, Any] = {part: {} for part in SHARDED_PARTS}
    for part in ("student", "teacher"):
        for name in shards[0][part]:
            out[part][name] = mine([s[part][name] for s in shards])
    for index, slots in shards[0]["optimizer"].items():
        out["optimizer"][index] = {slot: mine([s["optimizer"][index][slot] for s in shards])
                                   for slot in slots}
    return out


def load_rank(path: str | Path, rank: int) -> dict[str, Any]:
    """``rank_XXXXX.pt`` of a checkpoint: RNG states, augmentation generator, data position."""
    file = rank_file(path, rank)
    state = _read(file, f"process {rank}'s RNG states and data position")
    missing = [k for k in ("step", "rng", "augment_rng", "data")
               if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{file}: not a midnight-train rank file (no {', '.join(missing)})")
    return state


def load_newest(candidates: list[Path], read: Callable[[Path], Any],
                skipped: list[str]) -> tuple[Path, Any] | None:
    """The first of ``candidates`` (newest first) that ``read`` reads without a
    ``CheckpointError``; the reasons for the others are appended to ``skipped``."""
    for path in candidates:
        try:
            return path, read(path)
        except CheckpointError as err:
            skipped.append(str(err))
    return None

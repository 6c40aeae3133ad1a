"""A run's state and its checkpoints: the networks, loss state and optimiser (``Networks``),
the RNG states, and how they go into a checkpoint and come back from one.

Saved: ``model.pt`` (process 0: student, teacher, objective, optimiser, config, precision) and
one rank file per process (step, RNGs, the augmentation generator, the data position, a replica
fingerprint); sharded (FSDP), each process also writes its slices and ``model.pt`` holds the
rest (``midnight_train.loop.checkpoint``, the files). Restored: plain, from each process's own
slices (a sharded checkpoint of as many slices), from the rows of the saved slices this process
needs (a sharded checkpoint of another number: memory-mapped, never the whole model), or by
cutting whole tensors into this process's slices (a checkpoint of a replicated run)."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from midnight_train.loop import checkpoint
from midnight_train.loop.checkpoint import CheckpointError, list_checkpoints
from midnight_train.loop.distributed import ShardLayout, rank_slice, split_sharded
from midnight_train.loop.errors import RunError
from midnight_train.method.student_teacher import DTensor, local_tensor


@dataclass
class Networks:
    """What the optimiser step changes: student (wrapped for DDP, or sharded), teacher (plain or
    sharded alike), the objective's loss state (centering buffers) and the optimiser."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    objective: torch.nn.Module
    optimizer: torch.optim.Optimizer


# ----------------------------------------------------------------------------- RNG states


def rng_states() -> dict[str, Any]:
    """The process's RNG states as tensors and plain values (safe to load, see checkpoint)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"] = {"key": np_state["state"]["key"].tolist(),
                         "pos": int(np_state["state"]["pos"])}
    np_state["has_gauss"], np_state["gauss"] = int(np_state["has_gauss"]), float(np_state["gauss"])
    state = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):  # this version: the key as a list of ints
        np_state = {**np_state, "state": {**np_state["state"],
                                          "key": np.asarray(np_state["state"]["key"], np.uint32)}}
    np.random.set_state(np_state)  # or an earlier version's tuple with an array
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def restore_generator(generator: torch.Generator, state: torch.Tensor,
                      fallback_seed: int) -> str | None:
    """Load a saved generator state, or, when it is another device's (a CPU generator's state is
    5056 bytes, a CUDA one's 16: a checkpoint written on the CPU resumed on a GPU, or the
    reverse), seed ``generator`` with ``fallback_seed`` and return what to warn about."""
    try:
        generator.set_state(state)
        return None
    except (RuntimeError, TypeError) as err:
        generator.manual_seed(fallback_seed)
        return (f"the checkpoint's augmentation generator state ({state.numel()} bytes) is not a "
                f"{generator.device.type} generator's ({str(err).splitlines()[0][:120]}): it "
                f"was written on another kind of device. Reseeded from the step: the run goes "
                f"on, but not bit-for-bit as it would have on the device it started on")


# ----------------------------------------------------------------------------- saving


def model_state(nets: Networks, acc, *, fsdp: bool) -> tuple[dict, dict, dict, dict | None]:
    """(student, teacher, optimizer) state dicts for ``model.pt`` and, sharded, this process's
    slices of all three (``shard``) with ``model.pt`` keeping the rest. Every process calls it
    (gathering a state dict may communicate)."""
    if not fsdp:
        return (acc.get_state_dict(nets.student), nets.teacher.state_dict(),
                nets.optimizer.state_dict(), None)
    student_own, student = split_sharded(nets.student.state_dict())
    teacher_own, teacher = split_sharded(nets.teacher.state_dict())
    optimizer = nets.optimizer.state_dict()
    slots = {i: split_sharded(state) for i, state in optimizer["state"].items()}
    optimizer = {**optimizer, "state": {i: rest for i, (_, rest) in slots.items()}}
    shard = {"student": student_own, "teacher": teacher_own,
             "optimizer": {i: own for i, (own, _) in slots.items() if own}}
    return student, teacher, optimizer, shard


@torch.no_grad()
def replica_fingerprint(nets: Networks, acc, step: int) -> list[float]:
    """Per-tensor sums of student and teacher parameters, compared across ranks: data parallel
    replicas that drift apart would silently train different models."""
    student = acc.unwrap_model(nets.student)
    tensors = list(student.parameters()) + list(nets.teacher.parameters())
    local = torch.stack([t.detach().double().sum() for t in tensors])
    if acc.num_processes > 1:
        everyone = acc.gather(local[None].to(acc.device))
        if not bool((everyone == everyone[0]).all()):
            raise RuntimeError(f"step {step}: model replicas differ across ranks")
    return local.cpu().tolist()


# ----------------------------------------------------------------------------- resuming


def read_checkpoint(path: Path, *, layout: ShardLayout | None, rank: int, world_size: int,
                    everyone: Callable[[bool], bool]) -> tuple[dict, dict | None]:
    """``model.pt`` (with this process's slices when sharded: ``layout``) and this process's
    rank file (None when the checkpoint was written by another number of processes); a
    CheckpointError on every process if any fails."""
    error = None
    state: dict = {}
    rank_state = None
    try:
        state = checkpoint.load(path, join=False)
        saved = int(state.get("sharded") or 0)
        if layout is not None and saved == layout.shard_size:
            state["shard"] = checkpoint.load_shard(path, layout.shard_rank)  # its own slices
        elif layout is not None and saved:
            state["shard"] = checkpoint.load_resliced(path, saved, layout.shard_rank,
                                                      layout.shard_size)
        elif saved:
            state = checkpoint.load(path)  # replicated: whole tensors from all slices
        if state["world_size"] == world_size:
            rank_state = checkpoint.load_rank(path, rank)
    except CheckpointError as err:
        error = err
        if rank != 0:  # process 0 only learns that some process failed
            print(f"warning: process {rank}: {err}", file=sys.stderr, flush=True)
    if not everyone(error is None):
        raise error or CheckpointError(f"{path}: another process's rank or shard file is "
                                       f"unreadable")
    return state, rank_state


def find_checkpoint(resume: str | None, output_dir: Path, read: Callable[[Path], Any],
                    say: Callable[..., None]) -> tuple[Path, dict, dict | None] | None:
    """The checkpoint ``resume`` names: ``auto`` = the newest readable one in output_dir
    (damaged newer ones are skipped and named; none at all = a fresh start), or a path."""
    if not resume:
        return None
    if resume == "auto":
        candidates = list_checkpoints(output_dir)[::-1]
        if not candidates:
            say(f"resume=auto: no checkpoint in {output_dir / checkpoint.CHECKPOINT_DIR} yet: "
                f"starting at step 0")
            return None
    else:
        candidates = [Path(resume)]
    skipped: list[str] = []
    found = checkpoint.load_newest(candidates, read, skipped)
    if found is None:
        raise RunError(f"resume={resume}: no usable checkpoint: {'; '.join(skipped)}")
    for reason in skipped:
        say(f"skipped damaged checkpoint: {reason}", warning=True)
    path, (state, rank_state) = found
    return path, state, rank_state


def load_state(path: Path, state: dict, nets: Networks, acc, *,
               layout: ShardLayout | None) -> None:
    """Restore student, teacher, optimiser and loss state from ``model.pt``'s state."""
    try:
        if layout is not None:
            load_sharded(state, nets, layout.shard_rank, layout.shard_size)
        else:
            acc.unwrap_model(nets.student).load_state_dict(state["student"])
            nets.teacher.load_state_dict(state["teacher"])
            nets.optimizer.load_state_dict(state["optimizer"])
        nets.objective.load_state_dict(state["objective"])
    except (RuntimeError, ValueError, KeyError) as err:
        # torch lists every mismatch after a header line: name the first one.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = (lines[1] if len(lines) > 1 else lines[0] if lines else repr(err))[:300]
        raise CheckpointError(
            f"{path}: does not fit the model of this config ({first}); continue it with the "
            f"checkpoint's model: section") from err


@torch.no_grad()
def load_sharded(state: dict, nets: Networks, rank: int, world_size: int) -> None:
    """Fill the sharded networks and optimiser: from this process's slices (``state["shard"]``)
    or by cutting whole tensors; ``rank`` of ``world_size`` is the slice of a copy."""
    own = state.get("shard") or {}
    for part, net in (("student", nets.student), ("teacher", nets.teacher)):
        whole, mine = state[part], own.get(part, {})
        current = net.state_dict(keep_vars=True)
        known = set(whole) | set(mine)
        if known != set(current):
            odd = sorted(known ^ set(current))
            raise KeyError(f"{part}: Error(s) in loading state_dict\n"
                           f"{len(odd)} mismatched key(s), e.g. {odd[0]}")
        for name, tensor in current.items():
            target = local_tensor(tensor)
            if name in mine:
                value = mine[name]
            elif isinstance(tensor, DTensor):
                value = rank_slice(whole[name], rank, world_size)
            else:
                value = whole[name]
            if value.shape != target.shape:
                raise RuntimeError(f"Error(s) in loading state_dict\nsize mismatch for "
                                   f"{part}.{name}: {tuple(value.shape)} in the checkpoint, "
                                   f"{tuple(target.shape)} here")
            target.copy_(value)
    saved = state["optimizer"]
    params = [p for g in nets.optimizer.param_groups for p in g["params"]]
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for index, entries in saved["state"].items():
        param = params[int(index)]
        mine = own.get("optimizer", {}).get(index, {})
        slots[index] = {}
        for slot, value in {**entries, **mine}.items():
            if isinstance(param, DTensor) and (slot in mine or value.shape == param.shape):
                local = value if slot in mine else rank_slice(value, rank, world_size)
                value = DTensor.from_local(local.to(param.device), param.device_mesh,
                                           param.placements, shape=param.shape,
                                           stride=param.stride(), run_check=False)
            slots[index][slot] = value
    nets.optimizer.load_state_dict({"state": slots, "param_groups": saved["param_groups"]})

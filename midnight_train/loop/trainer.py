"""The training loop: one Accelerate code path for CPU tests, one GPU, many GPUs and many nodes.

Per optimiser step: ``grad_accum`` micro-batches (each: batch to device -> batched colour/HED
augmentation -> teacher forward -> student forward -> losses -> backward), gradient clipping,
AdamW step, EMA teacher update, metrics. Schedules are indexed by the optimiser step.

Checkpoints (``midnight_train.loop.checkpoint``): ``OUTPUT/checkpoints/step_XXXXXXXX/``, written
atomically, read without unpickling code. A run never mixes with another: a fresh run refuses an
output directory that is not empty (``overwrite=true`` replaces the earlier run); ``resume=auto``
continues from the newest readable checkpoint (damaged ones are skipped and named) and refuses
config changes other than ``config.RESUME_MAY_CHANGE`` (``resume_allow_changes=true`` accepts
them).

Preemption: SIGTERM or SIGUSR1 (``StopSignals``) lets the current optimiser step finish; its flag
travels in the step's one reduction of the losses, so every process stops after the same step;
then a checkpoint is written and ``Preempted`` ends the run (the CLI exits with status 75,
"preempted, resume with resume=auto"). A second signal exits at once. DataLoader workers are
started with the stop signals blocked, so a signal to a whole process group does not kill them.

Scale-out. DDP (the default under ``accelerate launch``/``torchrun``) replicates the student;
the teacher is a plain module on every process, updated by the same EMA, so it stays in sync
without communication. FSDP (``train.fsdp=true`` or ``accelerate launch --use_fsdp``) shards
both with FSDP2 (``ssl.shard_student_teacher``: one unit per ViT block, every parameter split
along its first dimension), so each process's teacher slices pair with its student slices for
the EMA; bf16 compute, fp32 master weights and gradient reductions; checkpoints hold each
process's slices (``checkpoint``: joined for export or another number of processes), and an
``eval:`` section runs its forward passes on every process. Activation checkpointing
(``model.grad_checkpointing``) is the first lever for memory; the precision follows
``resolve_mixed_precision``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object

from midnight_train.config import RESUME_MAY_CHANGE, Config, config_changes, run_config, save_config
from midnight_train.loop import checkpoint
from midnight_train.loop.checkpoint import CHECKPOINT_DIR, CheckpointError, list_checkpoints
from midnight_train.method.schedules import Schedules, scaled_lr
from midnight_train.method.ssl import (
    DTensor,
    EMAPairs,
    SSLObjective,
    apply_schedule,
    build_student_teacher,
    ema_update,
    local_tensor,
    param_groups,
    shard_student_teacher,
)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CHECKPOINT_DIR, METRICS_FILE, CONFIG_FILE, TENSORBOARD_DIR)  # what a run writes
LOSS_TERMS = ("loss", "loss_dino", "loss_ibot", "loss_kde", "loss_koleo")
# Wall-clock metrics: they differ between otherwise identical runs.
TIMING_METRICS = ("samples_per_s", "step_s", "data_wait_s")
# The loader "starves" training when waiting for batches takes more than this share of the
# step time over a window of steps (warned with a doubling window, so rarer and rarer).
STARVED_FRACTION = 0.10
STARVED_WINDOW = 20


class RunError(RuntimeError):
    """The run cannot start or go on; the message says why and what to do (no traceback)."""


class NonFiniteLossError(RunError):
    pass


# EX_TEMPFAIL (sysexits.h): "try again later". `accelerate launch` and torchrun report any failed
# process as status 1; the message says what happened in any case.
PREEMPTED_EXIT = 75
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")  # SLURM, Kubernetes: before preemption / the time limit


class Preempted(RunError):
    """A stop signal ended the run after a checkpoint; ``resume=auto`` continues it exactly."""

    exit_code = PREEMPTED_EXIT


# ----------------------------------------------------------------------------- helpers


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


def adamw_implementation(groups: list[dict]) -> dict[str, bool]:
    """``fused=True`` (one kernel over all parameters, CPU and CUDA; ~7x faster than the default
    per-parameter loop on CPU for the 65k-prototype heads) where every parameter allows it, else
    ``foreach=True``. The same AdamW update either way."""
    params = [p for g in groups for p in g["params"]]
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        fused_ok = set(_get_fused_kernels_supported_devices())
    except ImportError:  # older torch
        fused_ok = {"cuda"}
    if params and all(p.device.type in fused_ok and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def _accelerate_config_precision() -> tuple[str | None, Path | None]:
    """``mixed_precision`` of Accelerate's default config file (``accelerate config`` writes it;
    ``accelerate launch`` reads it when no --config_file is given), if there is one."""
    try:
        from accelerate.commands.config.config_args import default_config_file
    except ImportError:
        return None, None
    path = Path(default_config_file)
    try:
        import yaml

        value = (yaml.safe_load(path.read_text()) or {}).get("mixed_precision")
    except (OSError, ValueError, AttributeError):
        return None, None
    return (str(value) if value is not None else None), path


def resolve_mixed_precision(configured: str, *, cpu: bool,
                            environ: dict[str, str] | None = None) -> tuple[str, str]:
    """The precision to train in (no / bf16 / fp16) and which source decided, for the run log.

    An explicit ``train.mixed_precision`` wins. ``auto`` takes Accelerate's choice when one was
    made: ``accelerate launch --mixed_precision X`` or its config file, both passed to the
    processes as ``ACCELERATE_MIXED_PRECISION``; else bf16 on a GPU, fp32 on the CPU.
    ``accelerate launch`` also passes ``no`` when nothing was chosen, so ``no`` counts as a
    choice only when Accelerate's default config file says so (``--mixed_precision no`` on the
    command line cannot be told apart from the default: use ``train.mixed_precision=no``)."""
    env = os.environ if environ is None else environ
    launched = env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() or None
    if configured != "auto":
        ignored = launched not in (None, "no", configured)
        return configured, (f"train.mixed_precision={configured} in the config"
                            + (f"; accelerate launch's {launched} ignored" if ignored else ""))
    auto = "train.mixed_precision=auto: "
    if launched in ("bf16", "fp16"):
        return launched, auto + "accelerate launch's choice (--mixed_precision or its config)"
    if launched == "no":
        from_file, path = _accelerate_config_precision()
        if from_file == "no":
            return "no", auto + f"mixed_precision 'no' in {path}"
    default, why = ("no", "fp32 on the CPU") if cpu else ("bf16", "bf16 on a GPU")
    if launched not in (None, "no"):
        why += f" (accelerate launch's {launched} is not supported here)"
    return default, auto + why


def resolve_fsdp(configured: bool, environ: dict[str, str] | None = None) -> tuple[bool, str]:
    """Whether to shard with FSDP, and which source decided: ``train.fsdp=true`` or
    ``accelerate launch --use_fsdp`` (an Accelerate config with ``distributed_type: FSDP``),
    which passes ``ACCELERATE_USE_FSDP=true`` to the processes. That variable is then removed,
    so that Accelerate stays in data-parallel mode and the trainer's own FSDP2 layout
    (``ssl.shard_student_teacher``) applies; Accelerate's FSDP_* options are not used."""
    env = os.environ if environ is None else environ
    launched = env.pop("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")
    if configured:
        return True, "train.fsdp=true"
    if launched:
        return True, "accelerate launch --use_fsdp"
    return False, ""


def _device_mesh(acc: Accelerator):
    """The 1-D mesh of all processes for FSDP2; a single process gets a process group of one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("nccl" if acc.device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1)
    return init_device_mesh(acc.device.type, (acc.num_processes,))


def _split_sharded(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A sharded module's state dict -> (this process's slices, copied to the CPU; the rest)."""
    own = {k: v.to_local().to("cpu", copy=True) for k, v in state.items()
           if isinstance(v, DTensor)}
    return own, {k: v for k, v in state.items() if k not in own}


def _slice(whole: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Process ``rank``'s slice of a whole tensor as FSDP2 cuts it (``torch.chunk`` along the
    first dimension; processes past the last chunk get an empty one)."""
    chunks = torch.chunk(whole, world_size, dim=0)
    return chunks[rank] if rank < len(chunks) else whole[:0]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


class StopSignals:
    """SIGTERM / SIGUSR1 handling for one ``fit``: the first signal asks the loop to stop after
    the current optimiser step (the processes agree on that step, then a checkpoint is written);
    a second one exits at once, without a checkpoint (the last complete one stays intact).

    The handler only sets a flag (and writes one line with ``os.write``, safe in a handler).
    Handlers can only be installed in the main thread; elsewhere (a notebook's worker thread)
    signals keep their previous behaviour."""

    def __init__(self, announce: bool):
        self.received: str | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"\nmidnight-train: second signal ({name}) after {self.received}: "
                        f"exiting at once, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received = name
        if self.announce:
            os.write(2, f"\nmidnight-train: {name}: stopping after this optimiser step with a "
                        f"checkpoint (a second signal exits at once)\n".encode())

    @contextlib.contextmanager
    def blocked(self):
        """The stop signals blocked for the calling thread (one that arrives meanwhile waits,
        then reaches the handler). Processes started inside (DataLoader workers) inherit the
        blocked mask and never see the stop signals: torchrun forwards SIGTERM to a worker's
        whole process group and SLURM signals every process of a job step, and a worker killed
        under a running step would end the run without a checkpoint. The training process
        stops its workers itself when it exits."""
        previous = None
        if self.usable():
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _stop_signums())
        try:
            yield
        finally:
            if previous is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def install(self) -> None:
        self._set(self._handle)

    def restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _set(self, handler) -> None:
        if not self.usable():
            return
        for signum in _stop_signums():
            previous = signal.signal(signum, handler)
            self._previous.setdefault(signum, previous)

    @staticmethod
    def usable() -> bool:
        return threading.current_thread() is threading.main_thread()


def _stop_signums() -> set[int]:
    return {getattr(signal, name) for name in STOP_SIGNALS}


class LoaderWatch:
    """Says when waiting for batches takes more than ``fraction`` of the step time, over windows
    of ``window`` steps that double after each warning. The first step of a run is left out
    (it waits for the loader's workers to start)."""

    def __init__(self, fraction: float, window: int):
        self.fraction, self.window = fraction, window
        self.started = False
        self._reset()

    def _reset(self) -> None:
        self.waited = self.took = 0.0
        self.first: int | None = None
        self.count = 0

    def add(self, step: int, waited: float, took: float,
            warn: Callable[[float, int, int], None]) -> None:
        if not self.started:
            self.started = True
            return
        self.waited, self.took, self.count = self.waited + waited, self.took + took, self.count + 1
        self.first = self.first or step
        if self.count < self.window:
            return
        share = self.waited / max(self.took, 1e-9)
        if share > self.fraction:
            warn(share, self.first, step)
            self.window *= 2
        self._reset()


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """``Trainer(cfg).fit()``. ``make_loader``/``augment`` default to the data pipeline's
    ``midnight_train.data.loader.make_loader`` and ``midnight_train.method.augment.ColorAugment`` (tests and
    benchmarks may inject others with the same contract)."""

    def __init__(self, cfg: Config, *, make_loader: Callable | None = None,
                 augment: Callable | None = None):
        self.cfg = cfg
        tc = cfg.train
        cpu = tc.cpu or not torch.cuda.is_available()
        mp, self.precision_source = resolve_mixed_precision(tc.mixed_precision, cpu=cpu)
        self.fsdp, self.fsdp_source = resolve_fsdp(tc.fsdp)
        if self.fsdp and mp == "fp16":
            raise RunError(f"FSDP ({self.fsdp_source}) trains in bf16 or fp32, not fp16 "
                           f"({self.precision_source}): set train.mixed_precision=bf16")
        self.output_dir = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=tc.grad_accum,
            log_with="tensorboard" if tc.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "tensorboard")),
        )
        acc = self.accelerator
        self.rank, self.world_size = acc.process_index, acc.num_processes
        self._build_models(mp)

        self.global_batch = cfg.data.batch_size * self.world_size * tc.grad_accum
        self.schedules = Schedules(
            total_steps=tc.max_steps,
            peak_lr=scaled_lr(tc.base_lr, self.global_batch, tc.lr_scaling),
            min_lr=tc.min_lr, warmup_steps=tc.warmup_steps,
            wd=tc.weight_decay, wd_end=tc.weight_decay_end,
            momentum=tc.teacher_momentum, momentum_end=tc.teacher_momentum_end,
            teacher_temp=cfg.loss.teacher_temp, teacher_temp_start=cfg.loss.teacher_temp_start,
            teacher_temp_warmup_steps=cfg.loss.teacher_temp_warmup_steps,
            freeze_last_layer_steps=tc.freeze_last_layer_steps)

        if make_loader is None:
            from midnight_train.data.loader import make_loader
        if augment is None:
            from midnight_train.method.augment import ColorAugment

            augment = ColorAugment(cfg.augment)
        self._make_loader, self.augment = make_loader, augment
        self.periodic_eval = None
        # Sharded, the teacher's forward needs every process: all of them evaluate.
        if cfg.eval is not None and cfg.eval.every and (self.is_main or self.fsdp):
            from midnight_train.method.augment import AugmentConfig
            from midnight_train.outputs.periodic_eval import PeriodicEval

            aug = cfg.augment or AugmentConfig()
            self.periodic_eval = PeriodicEval(cfg.eval, cfg.model.img_size,
                                              list(aug.mean), list(aug.std))
        self.aug_generator = torch.Generator(device=acc.device)
        self.aug_generator.manual_seed(tc.seed * 1_000_003 + 7919 * self.rank + 1)
        self.step = 0  # optimiser steps done
        self.loader: Any = None
        self._stop: StopSignals | None = None
        self._stop_agreed = False  # every process saw a stop signal's flag after this step
        self._starved = LoaderWatch(STARVED_FRACTION, STARVED_WINDOW)

    def _build_models(self, mp: str) -> None:
        """Student, teacher, loss state and optimiser on this process's device: replicated
        (DDP) or sharded (FSDP), the optimiser over what this process holds."""
        tc, acc = self.cfg.train, self.accelerator
        # Same seed everywhere for initialisation (identical replicas), then per-rank streams.
        torch.manual_seed(tc.seed)
        self.student, self.teacher = build_student_teacher(self.cfg.model)
        self.objective = SSLObjective(self.cfg.model, self.cfg.loss)
        if self.fsdp:  # sharding moves each process's slices to its device
            try:
                shard_student_teacher(self.student, self.teacher, _device_mesh(acc),
                                      torch.bfloat16 if mp == "bf16" else None)
            except ImportError as err:
                raise RunError(f"FSDP ({self.fsdp_source}) needs torch >= 2.6 "
                               f"(torch.distributed.fsdp.fully_shard): {err}") from err
        else:
            self.student.to(acc.device)  # before the optimiser: its implementation depends on it
            self.teacher.to(acc.device)
        groups = param_groups(self.student, tc.layerwise_decay, tc.patch_embed_lr_mult)
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(tc.betas),
                                           **adamw_implementation(groups))
        self.objective.to(acc.device)
        if self.fsdp:
            self.optimizer = acc.prepare(self.optimizer)
        else:
            self.student, self.optimizer = acc.prepare(self.student, self.optimizer)
        # Built once: per-step EMA is one multi-tensor op, without re-pairing parameters by name.
        self._ema_pairs = EMAPairs(self.teacher, acc.unwrap_model(self.student))

    # ------------------------------------------------------------------ state

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _checkpoint_root(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    def _say(self, message: str, *, warning: bool = False) -> None:
        if self.is_main:
            print(f"warning: {message}" if warning else message,
                  file=sys.stderr if warning else sys.stdout, flush=True)

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step (every process) and keep the newest K.
        Sharded (FSDP), every process writes its slices and model.pt holds the rest."""
        acc = self.accelerator
        fingerprint = None if self.fsdp else self._check_replicas_in_sync()
        shard = None
        if self.fsdp:
            student_own, student = _split_sharded(self.student.state_dict())
            teacher_own, teacher = _split_sharded(self.teacher.state_dict())
            optimizer = self.optimizer.state_dict()
            slots = {i: _split_sharded(state) for i, state in optimizer["state"].items()}
            optimizer = {**optimizer, "state": {i: rest for i, (_, rest) in slots.items()}}
            shard = {"student": student_own, "teacher": teacher_own,
                     "optimizer": {i: own for i, (own, _) in slots.items() if own}}
        else:
            student = acc.get_state_dict(self.student)
            teacher, optimizer = self.teacher.state_dict(), self.optimizer.state_dict()
        model = None
        if self.is_main:
            model = {"world_size": self.world_size, "config": run_config(self.cfg),
                     "precision": self.accelerator.mixed_precision,
                     "sharded": self.world_size if self.fsdp else 0,
                     "student": student, "teacher": teacher,
                     "objective": self.objective.state_dict(), "optimizer": optimizer}
        rank_state = {"step": self.step, "world_size": self.world_size, "rng": rng_states(),
                      "fingerprint": fingerprint, "augment_rng": self.aug_generator.get_state(),
                      "data": self.loader.state_dict() if self.loader is not None else None}
        return checkpoint.save(self.output_dir, self.step, rank=self.rank, rank_state=rank_state,
                               model=model, keep=self.cfg.train.keep_checkpoints,
                               barrier=acc.wait_for_everyone, shard=shard)

    @torch.no_grad()
    def _check_replicas_in_sync(self) -> list[float]:
        """Per-tensor sums of student and teacher parameters, compared across ranks: data
        parallel replicas that drift apart would silently train different models."""
        student = self.accelerator.unwrap_model(self.student)
        tensors = list(student.parameters()) + list(self.teacher.parameters())
        local = torch.stack([t.detach().double().sum() for t in tensors])
        if self.world_size > 1:
            everyone = self.accelerator.gather(local[None].to(self.accelerator.device))
            if not bool((everyone == everyone[0]).all()):
                raise RuntimeError(f"step {self.step}: model replicas differ across ranks")
        return local.cpu().tolist()

    def _everyone(self, ok: bool) -> bool:
        """True when ``ok`` holds on every process (so that all choose the same checkpoint)."""
        if self.world_size == 1:
            return ok
        flags = self.accelerator.gather(torch.tensor([int(ok)], device=self.accelerator.device))
        return bool(flags.min())

    def _read_checkpoint(self, path: Path) -> tuple[dict, dict | None]:
        """``model.pt`` and this process's rank file (None when the checkpoint was written by
        another number of processes); a CheckpointError on every process if any fails."""
        error = None
        try:
            state = checkpoint.load(path, join=False)
            if self.fsdp and state.get("sharded") == self.world_size:
                state["shard"] = checkpoint.load_shard(path, self.rank)  # this process's slices
            elif state.get("sharded"):
                state = checkpoint.load(path)  # whole tensors from all slices
            rank_state = None
            if state["world_size"] == self.world_size:
                rank_state = checkpoint.load_rank(path, self.rank)
        except CheckpointError as err:
            error = err
            if not self.is_main:  # process 0 only learns that some process failed
                print(f"warning: process {self.rank}: {err}", file=sys.stderr, flush=True)
        if not self._everyone(error is None):
            raise error or CheckpointError(f"{path}: another process's rank or shard file is "
                                           f"unreadable")
        return state, rank_state

    def find_checkpoint(self) -> tuple[Path, dict, dict | None] | None:
        """The checkpoint ``resume`` names: ``auto`` = the newest readable one in output_dir
        (damaged newer ones are skipped and named; none at all = a fresh start), or a path."""
        resume = self.cfg.resume
        if not resume:
            return None
        if resume == "auto":
            candidates = list_checkpoints(self.output_dir)[::-1]
            if not candidates:
                self._say(f"resume=auto: no checkpoint in {self._checkpoint_root()} yet: "
                          f"starting at step 0")
                return None
        else:
            candidates = [Path(resume)]
        skipped: list[str] = []
        found = checkpoint.load_newest(candidates, self._read_checkpoint, skipped)
        if found is None:
            raise RunError(f"resume={resume}: no usable checkpoint: {'; '.join(skipped)}")
        for reason in skipped:
            self._say(f"skipped damaged checkpoint: {reason}", warning=True)
        path, (state, rank_state) = found
        return path, state, rank_state

    def _check_config(self, path: Path, state: dict) -> None:
        changes = config_changes(state["config"], self.cfg)
        before, now = state.get("precision"), self.accelerator.mixed_precision
        if before is not None and before != now:  # train.mixed_precision=auto resolved otherwise
            changes.append(f"precision: {before!r} -> {now!r} ({self.precision_source})")
        if not changes:
            return
        listed = "; ".join(changes)
        if not self.cfg.resume_allow_changes:
            raise RunError(
                f"resume from {path}: the config differs from the checkpoint's in what it trains: "
                f"{listed}. Only these keys may change on resume: {', '.join(RESUME_MAY_CHANGE)}. "
                f"Restore the checkpoint's values, train into a new output_dir, or add "
                f"resume_allow_changes=true to continue with the new values")
        self._say(f"resume_allow_changes=true: continuing {path} with {listed}", warning=True)

    def _claim_output_dir(self, resumed: Path | None) -> None:
        """Refuse to mix this run with another in output_dir, or (overwrite=true) remove the
        other's files. Another run is: anything there, for a fresh start or a continuation from
        elsewhere; checkpoints after ``resumed``, for a continuation from one of output_dir's.
        resume=auto continues the newest readable checkpoint (any later one is a damaged one it
        skipped, replaced when the run gets there) or starts over in a run without any."""
        out = self.output_dir
        if not out.is_dir() or self.cfg.resume == "auto":
            return
        in_place = (resumed is not None
                    and resumed.resolve().parent == self._checkpoint_root().resolve())
        if in_place:
            stale = [p for p in list_checkpoints(out)
                     if (checkpoint.checkpoint_step(p) or 0) > self.step]
            what = f"holds checkpoints after step {self.step}"
        else:
            stale = sorted(out.iterdir())
            what = "is not empty"
        if not stale:
            return
        names = ", ".join(p.name for p in stale[:6]) + (" ..." if len(stale) > 6 else "")
        if not self.cfg.overwrite:
            how = "a new run" if resumed is None else f"continuing from {resumed}"
            raise RunError(
                f"output_dir {out} {what} ({names}): {how} would mix with the run there. "
                f"Continue that run with resume=auto, "
                f"{'discard them' if in_place else 'replace it'} with overwrite=true, or choose "
                f"another output_dir")
        self.accelerator.wait_for_everyone()  # every process has looked before anything goes
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
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: Path, state: dict) -> None:
        """Restore model, teacher, optimiser, loss state and step from ``model.pt``'s state."""
        try:
            if self.fsdp:
                self._load_sharded(state)
            else:
                self.accelerator.unwrap_model(self.student).load_state_dict(state["student"])
                self.teacher.load_state_dict(state["teacher"])
                self.optimizer.load_state_dict(state["optimizer"])
            self.objective.load_state_dict(state["objective"])
        except (RuntimeError, ValueError, KeyError) as err:
            # torch lists every mismatch after a header line: name the first one.
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            first = (lines[1] if len(lines) > 1 else lines[0] if lines else repr(err))[:300]
            raise CheckpointError(
                f"{path}: does not fit the model of this config ({first}); continue it with the "
                f"checkpoint's model: section") from err
        self.step = int(state["step"])
        if state["world_size"] != self.world_size:
            self._say(f"{path} was written by {state['world_size']} process(es), this run has "
                      f"{self.world_size}: the data stream and RNGs restart (seeded by the step), "
                      f"so the run does not continue exactly", warning=True)

    @torch.no_grad()
    def _load_sharded(self, state: dict) -> None:
        """Fill the sharded networks and optimiser: from this process's own slices (a sharded
        checkpoint of as many processes) or by cutting whole tensors (any other checkpoint)."""
        own = state.get("shard") or {}
        for part, net in (("student", self.student), ("teacher", self.teacher)):
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
                    value = _slice(whole[name], self.rank, self.world_size)
                else:
                    value = whole[name]
                if value.shape != target.shape:
                    raise RuntimeError(f"Error(s) in loading state_dict\nsize mismatch for "
                                       f"{part}.{name}: {tuple(value.shape)} in the checkpoint, "
                                       f"{tuple(target.shape)} here")
                target.copy_(value)
        saved = state["optimizer"]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for index, entries in saved["state"].items():
            param = params[int(index)]
            mine = own.get("optimizer", {}).get(index, {})
            slots[index] = {}
            for slot, value in {**entries, **mine}.items():
                if isinstance(param, DTensor) and (slot in mine or value.shape == param.shape):
                    local = value if slot in mine else _slice(value, self.rank, self.world_size)
                    value = DTensor.from_local(local.to(param.device), param.device_mesh,
                                               param.placements, shape=param.shape,
                                               stride=param.stride(), run_check=False)
                slots[index][slot] = value
        self.optimizer.load_state_dict({"state": slots, "param_groups": saved["param_groups"]})

    def _metrics_until(self, step: int) -> list[str]:
        """metrics.jsonl lines up to ``step`` (later ones are redone). A torn last line (a kill
        during a write) is dropped; damage elsewhere is an error naming the line."""
        metrics = self.output_dir / METRICS_FILE
        if not metrics.exists():
            return []
        lines = metrics.read_text().splitlines()
        keep = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    self._say(f"{metrics}: dropped a torn last line ({line[:40]!r}...)",
                              warning=True)
                    continue
                raise RunError(f"{metrics}, line {number}: not JSON ({line[:60]!r}); repair or "
                               f"delete that line, then resume again") from None
            if row.get("step", 0) <= step:
                keep.append(line + "\n")
        return keep

    # ------------------------------------------------------------------ loop

    def _check_finite(self, values: torch.Tensor, names: tuple[str, ...]) -> None:
        if bool(torch.isfinite(values).all()):
            return
        bad = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values.tolist(), strict=True)
                        if not math.isfinite(v))
        last = checkpoint.latest(self.output_dir)
        raise NonFiniteLossError(
            f"non-finite loss at step {self.step + 1}: {bad}. Stopping without writing a "
            f"checkpoint; the last good one is {last or 'none'}. Try a lower train.base_lr, "
            f"a longer train.warmup_steps or mixed_precision=no.")

    def _write_run_files(self, resumed: Path | None) -> None:
        """config.yaml, and metrics.jsonl cut back to the step continued from."""
        keep = self._metrics_until(self.step) if resumed is not None else []
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.output_dir / CONFIG_FILE)
        metrics = self.output_dir / METRICS_FILE
        if metrics.exists():
            metrics.write_text("".join(keep))

    def fit(self, stop_after: int | None = None) -> dict[str, float]:
        """Train to ``train.max_steps`` (or return after optimiser step ``stop_after``, which
        simulates an interruption in tests). Returns the last logged metrics. A stop signal
        (``STOP_SIGNALS``) ends it after a checkpoint with ``Preempted``."""
        rank_state = self._start()
        self._stop = stop = StopSignals(announce=self.is_main)
        stop.install()
        try:
            with stop.blocked():  # the loader's workers start now, never to see a stop signal
                batches = iter(self.loader)  # before restoring RNG: creating one may draw from it
            self._seed_rngs(rank_state)
            return self._loop(batches, stop_after)
        finally:
            stop.restore()
            for tracker in self.accelerator.trackers:
                tracker.finish()

    def close(self) -> None:
        """End the process's part in a multi-process run (the process group); a process that
        trains again after ``fit`` (tests, notebooks) calls it only at the very end."""
        self.accelerator.end_training()

    def _start(self) -> dict | None:
        """Resume (or not), claim output_dir, build the loader, write the run files; returns
        this process's rank state when the run continues exactly."""
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        found = self.find_checkpoint()
        path, rank_state = None, None
        if found is not None:
            path, state, rank_state = found
            self._check_config(path, state)
            self.load_checkpoint(path, state)
            del state
        self._claim_output_dir(path)
        acc.wait_for_everyone()  # every process has looked at output_dir before anything is written
        data_state = rank_state["data"] if rank_state else None
        seed = tc.seed if rank_state or not path else tc.seed + self.step
        # The data source is checked before anything is written: a wrong data.shards leaves
        # output_dir as it was.
        self.loader = self._make_loader(cfg.data, seed=seed, rank=self.rank,
                                        world_size=self.world_size, state=data_state)
        self._write_run_files(path)
        if path is not None:
            self._say(f"resumed from {path} (step {self.step})")
        acc.wait_for_everyone()
        if tc.tensorboard:
            acc.init_trackers("tensorboard")
        return rank_state

    def _seed_rngs(self, rank_state: dict | None) -> None:
        tc = self.cfg.train
        if rank_state:
            set_rng_states(rank_state["rng"])
            warning = restore_generator(self.aug_generator, rank_state["augment_rng"],
                                        tc.seed * 1_000_003 + 7919 * self.rank + 1 + self.step)
            if warning:
                self._say(warning, warning=True)
        else:
            per_rank = tc.seed * 1_000_003 + 7919 * self.rank + self.step
            torch.manual_seed(per_rank)
            random.seed(per_rank)
            np.random.seed(per_rank % 2**32)

    def _loop(self, batches, stop_after: int | None) -> dict[str, float]:
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        if self.is_main:
            n_params = sum(p.numel() for p in acc.unwrap_model(self.student).parameters())
            print(f"midnight-train: {cfg.model.arch} ({n_params / 1e6:.1f} M student params), "
                  f"{self.world_size} process(es) on {acc.device}, global batch "
                  f"{self.global_batch}, peak lr {self.schedules.peak_lr:.3g}, "
                  f"steps {self.step}->{tc.max_steps}, output {self.output_dir}", flush=True)
            print(f"precision: {acc.mixed_precision if acc.mixed_precision != 'no' else 'fp32'}"
                  f" ({self.precision_source})", flush=True)
            if self.fsdp:
                print(f"FSDP ({self.fsdp_source}): student and teacher sharded over "
                      f"{self.world_size} process(es), one unit per ViT block"
                      + ("; Accelerate's fsdp_config options are not used"
                         if "accelerate" in self.fsdp_source else ""), flush=True)
        last: dict[str, float] = {}
        progress = _progress(tc.max_steps, self.step, enabled=self.is_main and tc.progress)
        try:
            while self.step < tc.max_steps:
                last = self._train_step(batches)
                if cfg.eval is not None and cfg.eval.every and self.step % cfg.eval.every == 0:
                    if self.periodic_eval is not None:  # main process (all, sharded); others wait
                        scores = self._evaluate()
                        if self.is_main:
                            last = {**(last or {"step": self.step}), **scores}
                    acc.wait_for_everyone()
                if last and self.is_main:
                    with open(self.output_dir / METRICS_FILE, "a") as f:
                        f.write(json.dumps(last) + "\n")
                if last:
                    acc.log({k: v for k, v in last.items() if k != "step"}, step=self.step)
                if progress is not None:
                    progress.update(1)
                    if last:
                        progress.set_postfix(
                            loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                            cos=f"{last['teacher_cls_cos']:.3f}",
                            img_s=f"{last['samples_per_s']:.1f}",
                            wait=f"{last['data_wait_s'] / max(last['step_s'], 1e-9):.0%}")
                saved = None
                if self.step % tc.checkpoint_every == 0 or self.step == tc.max_steps:
                    saved = self.save_checkpoint()
                if self._stop_agreed:
                    self._preempted(saved or self.save_checkpoint())
                if stop_after is not None and self.step >= stop_after:
                    break
        finally:
            if progress is not None:
                progress.close()
        if self.is_main and self.step == tc.max_steps:
            print(f"done: metrics {self.output_dir / METRICS_FILE}, checkpoints "
                  f"{self._checkpoint_root()}", flush=True)
        return last

    def _evaluate(self) -> dict[str, float]:
        """``eval:`` scores of the teacher backbone. Sharded, every process runs the same
        forward passes (each block gathers its weights from all of them) with the backbone's
        own weights (patch embedding, tokens, final norm) gathered for the duration."""
        assert self.periodic_eval is not None
        if not self.fsdp:
            return self.periodic_eval(self.teacher.backbone.vit)
        backbone = self.teacher.backbone
        backbone.unshard()
        try:
            return self.periodic_eval(backbone.vit)
        finally:
            backbone.reshard()

    def _preempted(self, path: Path) -> None:
        """Stop after a stop signal: every process reached the same step and saved ``path``."""
        why = self._stop.received or "a stop signal to another process"
        message = (f"preempted, resume with resume=auto: {why} at step {self.step} of "
                   f"{self.cfg.train.max_steps}; checkpoint {path}")
        if self.is_main:
            print(f"midnight-train: {message}", file=sys.stderr, flush=True)
        raise Preempted(message)

    def _train_step(self, batches) -> dict[str, float]:
        """One optimiser step. The only host-device synchronisations: one copy of the reduced
        losses to the host after the last backward (the non-finite check, before the update, so
        a NaN never reaches the weights; the stop-signal flag and the time spent waiting for
        batches ride along), and the conversion of the metrics on logged steps."""
        tc, acc = self.cfg.train, self.accelerator
        values = self.schedules.at(self.step)
        apply_schedule(self.optimizer, values.lr, values.wd, values.last_layer_frozen)
        self.student.train()
        start = time.perf_counter()
        names: tuple[str, ...] = ()
        n_losses = 0
        summed: torch.Tensor | None = None
        totals = torch.zeros(0)
        grad_norm = torch.zeros((), device=acc.device)
        for _ in range(tc.grad_accum):
            waiting = time.perf_counter()
            raw = next(batches)
            waited = time.perf_counter() - waiting
            batch = self.augment(to_device(raw, acc.device), self.aug_generator)
            with acc.accumulate(self.student):
                losses, monitors = self.objective(self.student, self.teacher, batch,
                                                  values.teacher_temp, acc.autocast)
                names, n_losses = tuple(losses) + tuple(monitors), len(losses)
                # Reduced with the losses in the step's one collective: the seconds this process
                # waited for the batch, and 1 where a stop signal arrived (so that every process
                # stops after the same step).
                extra = [torch.full((1,), waited, device=acc.device),
                         torch.full((1,), float(self._stop_requested()), device=acc.device)]
                local = torch.cat([torch.stack([v.detach().float() for v in
                                                list(losses.values()) + list(monitors.values())]),
                                   *extra])
                reduced = acc.reduce(local, reduction="mean")  # one collective per micro-step
                summed = reduced if summed is None else summed + reduced
                if self.fsdp:  # reduce-scatter the gradients once, after the last micro-step
                    self.student.set_requires_gradient_sync(acc.sync_gradients)
                acc.backward(losses["loss"])
                if acc.sync_gradients:
                    totals = summed.cpu()
                    # Any non-finite micro-step makes the sum non-finite (nan/inf never cancel).
                    self._check_finite(totals[:n_losses] / tc.grad_accum, names[:n_losses])
                    self._stop_agreed = bool(totals[-1] > 0)
                    grad_norm = acc.clip_grad_norm_(self.student.parameters(),
                                                    tc.clip_grad if tc.clip_grad > 0 else math.inf)
                    if isinstance(grad_norm, DTensor):  # sharded: the norm of all slices
                        grad_norm = grad_norm.full_tensor()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.teacher, acc.unwrap_model(self.student), values.teacher_momentum,
                   self._ema_pairs)
        self.step += 1
        step_s = time.perf_counter() - start
        data_wait_s = float(totals[-2])  # summed over micro-steps, mean over processes
        self._starved.add(self.step, data_wait_s, step_s, self._say_starved)
        if self.step % tc.log_every and self.step != tc.max_steps:
            return {}
        metrics: dict[str, Any] = {"step": self.step}
        metrics.update({n: float(v) for n, v in
                        zip(names, (totals[:-2] / tc.grad_accum).tolist(), strict=True)})
        metrics.update(lr=values.lr, wd=values.wd, teacher_momentum=values.teacher_momentum,
                       teacher_temp=values.teacher_temp, grad_norm=float(grad_norm),
                       samples_per_s=self.global_batch / max(step_s, 1e-9), step_s=step_s,
                       data_wait_s=data_wait_s)
        metrics.update(self._skip_counters())
        return metrics

    def _say_starved(self, fraction: float, first: int, last: int) -> None:
        workers = getattr(self.cfg.data, "num_workers", None)
        now = f", now {workers}" if workers is not None else ""
        self._say(f"the data loader is starving training: {fraction:.0%} of the time of steps "
                  f"{first}-{last} went to waiting for batches (data_wait_s in metrics.jsonl). "
                  f"Give it more loader workers (data.num_workers{now}) and CPU cores, or "
                  f"faster storage", warning=True)

    def _stop_requested(self) -> bool:
        return self._stop is not None and self._stop.received is not None

    def _skip_counters(self) -> dict[str, int]:
        counters = getattr(self.loader, "counters", None)
        local = dict(counters()) if callable(counters) else {}
        total: dict[str, int] = {}
        for part in (gather_object([local]) if self.world_size > 1 else [local]):
            for reason, n in part.items():
                total[f"skipped_{reason}"] = total.get(f"skipped_{reason}", 0) + int(n)
        return total


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: a bar only on a terminal, no noise in log files.
    return tqdm(total=total, initial=initial, disable=None, dynamic_ncols=True, unit="step")


def fit(cfg: Config, **kwargs) -> dict[str, float]:
    """Train ``cfg`` in this process, then close it (``Trainer.close``)."""
    trainer = Trainer(cfg, **kwargs)
    try:
        return trainer.fit()
    finally:
        trainer.close()

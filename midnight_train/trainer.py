"""The training loop: one Accelerate code path for CPU tests, one GPU, many GPUs and many nodes.

Per optimiser step: ``grad_accum`` micro-batches (each: batch to device -> batched colour/HED
augmentation -> teacher forward -> student forward -> losses -> backward), gradient clipping,
AdamW step, EMA teacher update, metrics. Schedules are indexed by the optimiser step.

Checkpoints are directories ``OUTPUT/checkpoints/step_XXXXXXXX/`` with ``model.pt`` (student,
teacher, optimiser, loss state, step) and one ``rank_XXXXX.pt`` per process (RNG states, colour
augmentation generator, data-stream position). They are written to a hidden temporary directory
and renamed into place, so a kill during a save leaves the previous checkpoint intact.

Scale-out notes. DDP (the default under ``accelerate launch``/``torchrun``) replicates the
student; the teacher is a plain module on every rank, updated by the same EMA, so it stays in
sync without communication. For ViT-g on many GPUs an FSDP path works by ``accelerate launch
--use_fsdp`` (FULL_SHARD, auto-wrap ``timm.models.vision_transformer.Block``, ``use_orig_params``
so the parameter groups survive); the teacher must then be wrapped the same way so that
``ema_update`` pairs shards with shards, and checkpoints should go through
``accelerator.get_state_dict``. Activation checkpointing (``model.grad_checkpointing``) is the
first lever for memory; bf16 autocast is on by default on GPUs.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object

from midnight_train.config import Config, save_config, to_plain
from midnight_train.schedules import Schedules, scaled_lr
from midnight_train.ssl import (
    EMAPairs,
    SSLObjective,
    apply_schedule,
    build_student_teacher,
    ema_update,
    param_groups,
)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LOSS_TERMS = ("loss", "loss_dino", "loss_ibot", "loss_kde", "loss_koleo")


class NonFiniteLossError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step_") or not (path / "model.pt").is_file():
        return None
    try:
        return int(name[len("step_"):])
    except ValueError:
        return None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary ``.tmp_*`` directories are never listed)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


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


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_states() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """``Trainer(cfg).fit()``. ``make_loader``/``augment`` default to the data pipeline's
    ``midnight_train.data.make_loader`` and ``midnight_train.augment.ColorAugment`` (tests and
    benchmarks may inject others with the same contract)."""

    def __init__(self, cfg: Config, *, make_loader: Callable | None = None,
                 augment: Callable | None = None):
        self.cfg = cfg
        tc = cfg.train
        cpu = tc.cpu or not torch.cuda.is_available()
        mp = tc.mixed_precision
        if mp == "auto":
            mp = "no" if cpu else "bf16"
        self.output_dir = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=tc.grad_accum,
            log_with="tensorboard" if tc.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / "tensorboard")),
        )
        acc = self.accelerator
        self.rank, self.world_size = acc.process_index, acc.num_processes
        # Same seed everywhere for initialisation (identical replicas), then per-rank streams.
        torch.manual_seed(tc.seed)
        self.student, self.teacher = build_student_teacher(cfg.model)
        self.objective = SSLObjective(cfg.model, cfg.loss)
        self.student.to(acc.device)  # before the optimiser: its implementation depends on it
        groups = param_groups(self.student, tc.layerwise_decay, tc.patch_embed_lr_mult)
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(tc.betas),
                                           **adamw_implementation(groups))
        self.teacher.to(acc.device)
        self.objective.to(acc.device)
        self.student, self.optimizer = acc.prepare(self.student, self.optimizer)
        # Built once: per-step EMA is one multi-tensor op, without re-pairing parameters by name.
        self._ema_pairs = EMAPairs(self.teacher, acc.unwrap_model(self.student))

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
            from midnight_train.data import make_loader
        if augment is None:
            from midnight_train.augment import ColorAugment

            augment = ColorAugment(cfg.augment)
        self._make_loader, self.augment = make_loader, augment
        self.aug_generator = torch.Generator(device=acc.device)
        self.aug_generator.manual_seed(tc.seed * 1_000_003 + 7919 * self.rank + 1)
        self.step = 0  # optimiser steps done
        self.loader: Any = None

    # ------------------------------------------------------------------ state

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _checkpoint_root(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step atomically and keep the newest K."""
        acc, step = self.accelerator, self.step
        root = self._checkpoint_root()
        final = root / f"step_{step:08d}"
        tmp = root / f".tmp_step_{step:08d}"
        if self.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        fingerprint = self._check_replicas_in_sync()
        _save({"step": step, "world_size": self.world_size, "rng": rng_states(),
               "fingerprint": fingerprint,
               "augment_rng": self.aug_generator.get_state(),
               "data": self.loader.state_dict() if self.loader is not None else None},
              tmp / f"rank_{self.rank:05d}.pt")
        student_state = acc.get_state_dict(self.student)  # collective under FSDP
        if self.is_main:
            _save({"step": step, "world_size": self.world_size, "config": to_plain(self.cfg),
                   "student": student_state, "teacher": self.teacher.state_dict(),
                   "objective": self.objective.state_dict(),
                   "optimizer": self.optimizer.state_dict()}, tmp / "model.pt")
        acc.wait_for_everyone()
        if self.is_main:
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. final == periodic)
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
            _fsync_dir(root)
            for old in list_checkpoints(self.output_dir)[: -max(self.cfg.train.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

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

    def _resume_path(self) -> Path | None:
        resume = self.cfg.resume
        if not resume:
            return None
        if resume == "auto":
            return latest_checkpoint(self.output_dir)  # none yet: a fresh start
        path = Path(resume)
        if checkpoint_step(path) is None:
            raise FileNotFoundError(f"resume={resume}: not a checkpoint directory with model.pt")
        return path

    def load_checkpoint(self, path: Path) -> dict | None:
        """Restore model, teacher, optimiser, loss state and step; returns this rank's state
        (RNG, data position), applied once the data stream exists."""
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
        self.accelerator.unwrap_model(self.student).load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.objective.load_state_dict(state["objective"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        rank_file = path / f"rank_{self.rank:05d}.pt"
        if state["world_size"] != self.world_size or not rank_file.exists():
            print(f"warning: {path} was written by {state['world_size']} processes, this run has "
                  f"{self.world_size}: the data stream and RNG restart (seeded by the step)",
                  file=sys.stderr)
            return None
        return torch.load(rank_file, map_location="cpu", weights_only=False)

    # ------------------------------------------------------------------ loop

    def _check_finite(self, values: torch.Tensor, names: tuple[str, ...]) -> None:
        if bool(torch.isfinite(values).all()):
            return
        bad = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values.tolist(), strict=True)
                        if not math.isfinite(v))
        last = latest_checkpoint(self.output_dir)
        raise NonFiniteLossError(
            f"non-finite loss at step {self.step + 1}: {bad}. Stopping without writing a "
            f"checkpoint; the last good one is {last or 'none'}. Try a lower train.base_lr, "
            f"a longer train.warmup_steps or mixed_precision=no.")

    def _prepare_output(self, resumed: bool) -> None:
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.output_dir / "config.yaml")
        metrics = self.output_dir / METRICS_FILE
        if metrics.exists():
            # Drop lines logged after the checkpoint we continue from (they will be redone).
            keep = []
            if resumed:
                for line in metrics.read_text().splitlines():
                    if line.strip() and json.loads(line).get("step", 0) <= self.step:
                        keep.append(line + "\n")
            metrics.write_text("".join(keep))

    def fit(self, stop_after: int | None = None) -> dict[str, float]:
        """Train to ``train.max_steps`` (or return after optimiser step ``stop_after``, which
        simulates an interruption in tests). Returns the last logged metrics."""
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        path = self._resume_path()
        rank_state = self.load_checkpoint(path) if path is not None else None
        self._prepare_output(resumed=path is not None)
        acc.wait_for_everyone()
        if tc.tensorboard:
            acc.init_trackers("tensorboard")

        data_state = rank_state["data"] if rank_state else None
        seed = tc.seed if rank_state or not path else tc.seed + self.step
        self.loader = self._make_loader(cfg.data, seed=seed, rank=self.rank,
                                        world_size=self.world_size, state=data_state)
        batches = iter(self.loader)  # before restoring RNG: creating an iterator may draw from it
        if rank_state:
            set_rng_states(rank_state["rng"])
            self.aug_generator.set_state(rank_state["augment_rng"])  # a CPU tensor on any device
        else:
            per_rank = tc.seed * 1_000_003 + 7919 * self.rank + self.step
            torch.manual_seed(per_rank)
            random.seed(per_rank)
            np.random.seed(per_rank % 2**32)

        if self.is_main:
            n_params = sum(p.numel() for p in acc.unwrap_model(self.student).parameters())
            print(f"midnight-train: {cfg.model.arch} ({n_params / 1e6:.1f} M student params), "
                  f"{self.world_size} process(es) on {acc.device}, global batch "
                  f"{self.global_batch}, peak lr {self.schedules.peak_lr:.3g}, "
                  f"steps {self.step}->{tc.max_steps}, output {self.output_dir}", flush=True)

        last: dict[str, float] = {}
        progress = _progress(tc.max_steps, self.step, enabled=self.is_main and tc.progress)
        try:
            while self.step < tc.max_steps:
                last = self._train_step(batches)
                if last and self.is_main:
                    with open(self.output_dir / METRICS_FILE, "a") as f:
                        f.write(json.dumps(last) + "\n")
                if last:
                    acc.log({k: v for k, v in last.items() if k != "step"}, step=self.step)
                if progress is not None:
                    progress.update(1)
                    if last:
                        progress.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                             cos=f"{last['teacher_cls_cos']:.3f}")
                if self.step % tc.checkpoint_every == 0 or self.step == tc.max_steps:
                    self.save_checkpoint()
                if stop_after is not None and self.step >= stop_after:
                    break
        finally:
            if progress is not None:
                progress.close()
            acc.end_training()
        if self.is_main and self.step == tc.max_steps:
            print(f"done: metrics {self.output_dir / METRICS_FILE}, checkpoints "
                  f"{self._checkpoint_root()}", flush=True)
        return last

    def _train_step(self, batches) -> dict[str, float]:
        """One optimiser step. The only host-device synchronisations: the non-finite check, once
        per optimiser step after the last backward (before the update, so a NaN never reaches the
        weights), and the conversion of the metrics on logged steps."""
        tc, acc = self.cfg.train, self.accelerator
        values = self.schedules.at(self.step)
        apply_schedule(self.optimizer, values.lr, values.wd, values.last_layer_frozen)
        self.student.train()
        start = time.perf_counter()
        names: tuple[str, ...] = ()
        n_losses = 0
        summed: torch.Tensor | None = None
        grad_norm = torch.zeros((), device=acc.device)
        for _ in range(tc.grad_accum):
            batch = self.augment(to_device(next(batches), acc.device), self.aug_generator)
            with acc.accumulate(self.student):
                losses, monitors = self.objective(self.student, self.teacher, batch,
                                                  values.teacher_temp, acc.autocast)
                names, n_losses = tuple(losses) + tuple(monitors), len(losses)
                local = torch.stack([v.detach().float() for v in
                                     list(losses.values()) + list(monitors.values())])
                reduced = acc.reduce(local, reduction="mean")  # one collective per micro-step
                summed = reduced if summed is None else summed + reduced
                acc.backward(losses["loss"])
                if acc.sync_gradients:
                    # Any non-finite micro-step makes the sum non-finite (nan/inf never cancel).
                    self._check_finite(summed[:n_losses] / tc.grad_accum, names[:n_losses])
                    grad_norm = acc.clip_grad_norm_(self.student.parameters(),
                                                    tc.clip_grad if tc.clip_grad > 0 else math.inf)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.teacher, acc.unwrap_model(self.student), values.teacher_momentum,
                   self._ema_pairs)
        self.step += 1
        if self.step % tc.log_every and self.step != tc.max_steps:
            return {}
        assert summed is not None
        metrics: dict[str, Any] = {"step": self.step}
        metrics.update({n: float(v) for n, v in zip(names, (summed / tc.grad_accum).tolist(),
                                                     strict=True)})
        metrics.update(lr=values.lr, wd=values.wd, teacher_momentum=values.teacher_momentum,
                       teacher_temp=values.teacher_temp, grad_norm=float(grad_norm),
                       samples_per_s=self.global_batch / max(time.perf_counter() - start, 1e-9))
        metrics.update(self._skip_counters())
        return metrics

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
    return Trainer(cfg, **kwargs).fit()

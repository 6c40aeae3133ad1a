"""The training run: one Accelerate code path for CPU tests, one GPU, many GPUs and many nodes.

``Trainer(cfg).fit()`` wires the parts together and runs the loop; each concern lives in its own
module:

- ``run_dir``: the output folder (claimed, never mixed with another run), config.yaml,
  metrics.jsonl;
- ``distributed``: precision, DDP or FSDP2 (student and teacher sharded alike), the mesh;
- ``train_state`` and ``checkpoint``: what a checkpoint holds, writing it, finding the one to
  resume and loading it (plain or sharded);
- ``signals``: SIGTERM/SIGUSR1 -> a checkpoint at a step every process agrees on, exit 75;
- ``step``: one optimiser step, read as the recipe (batch -> augment -> forward -> losses ->
  backward -> clip -> step -> EMA -> log);
- ``watch``: a warning when the loader starves the step;
- ``kernels``: ``train.compile`` and ``train.deterministic``.

The loop: for each optimiser step, the step, then periodic evaluation (``eval:``), metrics,
checkpoints, and the stop decision. Activation checkpointing (``model.grad_checkpointing``) is
the first lever for memory.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

from midnight_train.config import Config, run_config
from midnight_train.loop import checkpoint, watch
from midnight_train.loop.distributed import (
    ShardLayout,
    device_mesh,
    resolve_fsdp,
    resolve_mixed_precision,
    shard_layout,
    shard_student_teacher,
)
from midnight_train.loop.errors import RunError
from midnight_train.loop.kernels import compile_blocks, deterministic_mode
from midnight_train.loop.run_dir import TENSORBOARD_DIR, RunDir
from midnight_train.loop.signals import Preempted, StopSignals
from midnight_train.loop.step import TrainStep
from midnight_train.loop.train_state import (
    Networks,
    find_checkpoint,
    load_state,
    model_state,
    read_checkpoint,
    replica_fingerprint,
    restore_generator,
    rng_states,
    set_rng_states,
)
from midnight_train.method.objective import SSLObjective
from midnight_train.method.schedules import Schedules, lr_batch, scaled_lr
from midnight_train.method.student_teacher import build_student_teacher, param_groups


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


def build_networks(cfg: Config, acc: Accelerator, mp: str, layout: ShardLayout | None,
                   fsdp_source: str) -> Networks:
    """Student, teacher, loss state and optimiser on this process's device: replicated (DDP) or
    sharded (FSDP, ``layout``), the optimiser over what this process holds."""
    tc = cfg.train
    # Same seed everywhere for initialisation (identical replicas), then per-rank streams.
    torch.manual_seed(tc.seed)
    student, teacher = build_student_teacher(cfg.model)
    if tc.compile:
        compile_blocks(student, teacher)
    objective = SSLObjective(cfg.model, cfg.loss)
    if layout is not None:  # sharding moves each process's slices to its device
        try:
            mesh = device_mesh(acc.device, acc.num_processes, layout,
                               timedelta(seconds=tc.dist_timeout_s))
            shard_student_teacher(student, teacher, mesh,
                                  torch.bfloat16 if mp == "bf16" else None, layout.keep_gathered)
        except ImportError as err:
            raise RunError(f"FSDP ({fsdp_source}) needs torch >= 2.6 "
                           f"(torch.distributed.fsdp.fully_shard): {err}") from err
    else:
        student.to(acc.device)  # before the optimiser: its implementation depends on it
        teacher.to(acc.device)
    groups = param_groups(student, tc.layerwise_decay, tc.patch_embed_lr_mult)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(tc.betas),
                                  **adamw_implementation(groups))
    objective.to(acc.device)
    if layout is not None:
        optimizer = acc.prepare(optimizer)
    else:
        student, optimizer = acc.prepare(student, optimizer)
    return Networks(student, teacher, objective, optimizer)


class Trainer:
    """``Trainer(cfg).fit()``. ``make_loader``/``augment`` default to the data pipeline's
    ``midnight_train.data.loader.make_loader`` and ``midnight_train.method.augment.ColorAugment``
    (tests and benchmarks may inject others with the same contract)."""

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
        self.kernels_note = deterministic_mode() if tc.deterministic else None
        self.accelerator = acc = Accelerator(
            cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=tc.grad_accum,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=tc.dist_timeout_s))],
            log_with="tensorboard" if tc.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / TENSORBOARD_DIR)),
        )
        self.rank, self.world_size = acc.process_index, acc.num_processes
        self.run_dir = RunDir(self.output_dir, is_main=acc.is_main_process,
                              barrier=acc.wait_for_everyone)
        self.layout = None
        if self.fsdp:
            try:
                self.layout = shard_layout(self.rank, self.world_size, tc.fsdp_shard_size,
                                           tc.fsdp_keep_gathered)
            except ValueError as err:
                raise RunError(str(err)) from None
        self.nets = build_networks(cfg, acc, mp, self.layout, self.fsdp_source)

        self.global_batch = cfg.data.batch_size * self.world_size * tc.grad_accum
        self.lr_batch = lr_batch(cfg.data.batch_size, self.world_size, tc.grad_accum,
                                 tc.lr_scaling_batch)
        self.schedules = Schedules(
            total_steps=tc.max_steps,
            peak_lr=scaled_lr(tc.base_lr, self.lr_batch, tc.lr_scaling),
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
        self._make_loader = make_loader
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
        self.train_step = TrainStep(tc, acc, self.nets, self.schedules, augment,
                                    self.aug_generator, fsdp=self.fsdp,
                                    global_batch=self.global_batch, output_dir=self.output_dir)
        self.step = 0  # optimiser steps done
        self.loader: Any = None
        self._stop: StopSignals | None = None
        self._starved = watch.LoaderWatch(watch.STARVED_FRACTION, watch.STARVED_WINDOW)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def student(self) -> torch.nn.Module:
        return self.nets.student

    @property
    def teacher(self) -> torch.nn.Module:
        return self.nets.teacher

    @property
    def objective(self) -> torch.nn.Module:
        return self.nets.objective

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.nets.optimizer

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step (every process) and keep the newest K."""
        acc = self.accelerator
        fingerprint = None if self.fsdp else replica_fingerprint(self.nets, acc, self.step)
        student, teacher, optimizer, shard = model_state(self.nets, acc, fsdp=self.fsdp)
        model = None
        if self.is_main:
            model = {"world_size": self.world_size, "config": run_config(self.cfg),
                     "precision": acc.mixed_precision,
                     "sharded": self.layout.shard_size if self.layout else 0,
                     "student": student, "teacher": teacher,
                     "objective": self.nets.objective.state_dict(), "optimizer": optimizer}
        rank_state = {"step": self.step, "world_size": self.world_size, "rng": rng_states(),
                      "fingerprint": fingerprint, "augment_rng": self.aug_generator.get_state(),
                      "data": self.loader.state_dict() if self.loader is not None else None}
        layout = self.layout
        if layout is not None and layout.replica:  # the other groups hold the same slices
            shard = None
        return checkpoint.save(self.output_dir, self.step, rank=self.rank, rank_state=rank_state,
                               model=model, keep=self.cfg.train.keep_checkpoints,
                               barrier=acc.wait_for_everyone, shard=shard,
                               shard_index=layout.shard_rank if layout else None)

    def _everyone(self, ok: bool) -> bool:
        """True when ``ok`` holds on every process (so that all choose the same checkpoint)."""
        if self.world_size == 1:
            return ok
        flags = self.accelerator.gather(torch.tensor([int(ok)], device=self.accelerator.device))
        return bool(flags.min())

    def _resume(self) -> tuple[Path | None, dict | None]:
        """Load the checkpoint ``resume`` names, if any: (its path, this process's rank state
        when the run continues exactly)."""
        def read(path: Path):
            return read_checkpoint(path, layout=self.layout, rank=self.rank,
                                   world_size=self.world_size, everyone=self._everyone)

        found = find_checkpoint(self.cfg.resume, self.output_dir, read, self.run_dir.say)
        if found is None:
            return None, None
        path, state, rank_state = found
        self.run_dir.check_config(self.cfg, path, state, self.accelerator.mixed_precision,
                                  self.precision_source)
        load_state(path, state, self.nets, self.accelerator, layout=self.layout)
        self.step = int(state["step"])
        if state["world_size"] != self.world_size:
            self.run_dir.say(f"{path} was written by {state['world_size']} process(es), this "
                             f"run has {self.world_size}: the data stream and RNGs restart "
                             f"(seeded by the step), so the run does not continue exactly",
                             warning=True)
        return path, rank_state

    # ------------------------------------------------------------------ the run

    def fit(self, stop_after: int | None = None) -> dict[str, float]:
        """Train to ``train.max_steps`` (or return after optimiser step ``stop_after``, which
        simulates an interruption in tests). Returns the last logged metrics. A stop signal
        (``signals.STOP_SIGNALS``) ends it after a checkpoint with ``Preempted``."""
        rank_state = self._start()
        self._stop = stop = StopSignals(announce=self.is_main)
        stop.install()
        try:
            with stop.blocked():  # the loader's workers start now, never to see a stop signal
                batches = iter(self.loader)  # before restoring RNG: creating one may draw from it
            self._seed_rngs(rank_state)
            return self._loop(batches, stop_after)
        finally:
            # Every way out stops the loader's workers (an error in the step or an evaluation
            # leaves them running, and they block SIGTERM: the process would never exit).
            close = getattr(self.loader, "close", None)
            if close is not None:
                close()
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
        path, rank_state = self._resume()
        self.run_dir.claim(cfg, path, self.step)
        acc.wait_for_everyone()  # every process has looked at output_dir before anything is written
        data_state = rank_state["data"] if rank_state else None
        seed = tc.seed if rank_state or not path else tc.seed + self.step
        # The data source is checked before anything is written: a wrong data.shards leaves
        # output_dir as it was.
        self.loader = self._make_loader(cfg.data, seed=seed, rank=self.rank,
                                        world_size=self.world_size, state=data_state)
        self.run_dir.write_run_files(cfg, path, self.step, self.world_size)
        if path is not None:
            self.run_dir.say(f"resumed from {path} (step {self.step})")
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
                self.run_dir.say(warning, warning=True)
        else:
            per_rank = tc.seed * 1_000_003 + 7919 * self.rank + self.step
            torch.manual_seed(per_rank)
            random.seed(per_rank)
            np.random.seed(per_rank % 2**32)

    def _announce(self) -> None:
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        n_params = sum(p.numel() for p in acc.unwrap_model(self.student).parameters())
        print(f"midnight-train: {cfg.model.arch} ({n_params / 1e6:.1f} M student params), "
              f"{self.world_size} process(es) on {acc.device}, global batch "
              f"{self.global_batch}, peak lr {self.schedules.peak_lr:.3g} (base "
              f"{tc.base_lr:.3g}, {tc.lr_scaling} of batch {self.lr_batch} / 1024, "
              f"train.lr_scaling_batch={tc.lr_scaling_batch}), "
              f"steps {self.step}->{tc.max_steps}, output {self.output_dir}", flush=True)
        print(f"precision: {acc.mixed_precision if acc.mixed_precision != 'no' else 'fp32'}"
              f" ({self.precision_source})", flush=True)
        if self.kernels_note:
            print(self.kernels_note, flush=True)
        if tc.compile:
            print("torch.compile: each ViT block (train.compile=true); the first steps compile",
                  flush=True)
        if self.layout is not None:
            print(f"FSDP ({self.fsdp_source}): {self.layout.describe(self.world_size)}"
                  + ("; Accelerate's fsdp_config options are not used"
                     if "accelerate" in self.fsdp_source else ""), flush=True)

    def _loop(self, batches, stop_after: int | None) -> dict[str, float]:
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        if self.is_main:
            self._announce()
        last: dict[str, float] = {}
        progress = _progress(tc.max_steps, self.step, enabled=self.is_main and tc.progress)
        try:
            while self.step < tc.max_steps:
                done = self.train_step(batches, self.step, stop_requested=self._stop_requested,
                                       loader=self.loader)
                self.step += 1
                self._starved.add(self.step, done.data_wait_s, done.step_s, self._say_starved)
                last = done.metrics
                if cfg.eval is not None and cfg.eval.every and self.step % cfg.eval.every == 0:
                    if self.periodic_eval is not None:  # main process (all, sharded); others wait
                        scores = self._evaluate()
                        if self.is_main:
                            last = {**(last or {"step": self.step}), **scores}
                    acc.wait_for_everyone()
                if last:
                    self.run_dir.append_metrics(last)
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
                if done.stop_agreed:
                    self._preempted(saved or self.save_checkpoint())
                if stop_after is not None and self.step >= stop_after:
                    break
        finally:
            if progress is not None:
                progress.close()
        if self.is_main and self.step == tc.max_steps:
            print(f"done: metrics {self.run_dir.metrics}, checkpoints "
                  f"{self.run_dir.checkpoints}", flush=True)
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

    def _say_starved(self, fraction: float, first: int, last: int) -> None:
        workers = getattr(self.cfg.data, "num_workers", None)
        self.run_dir.say(watch.starving_message(fraction, first, last, workers), warning=True)

    def _stop_requested(self) -> bool:
        return self._stop is not None and self._stop.received is not None


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

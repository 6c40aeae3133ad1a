"""One optimiser step, read top to bottom as the recipe:

    batch -> augment -> forward -> losses -> backward -> clip (per part) -> step -> EMA -> log

``grad_accum`` micro-batches (each: batch to the device, batched colour/HED augmentation,
teacher and student forwards and the losses in ``SSLObjective``, backward), then gradient
clipping, the AdamW step and the EMA teacher update; schedules are indexed by the optimiser step.
The host waits for the device once per step: one copy of the reduced losses after the last
backward (the non-finite check, before the update, so a NaN never reaches the weights; the stop
flag and the time spent waiting for batches ride along), plus the metrics on logged steps."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from midnight_train.config import TrainConfig
from midnight_train.loop import checkpoint
from midnight_train.loop.errors import NonFiniteLossError
from midnight_train.loop.train_state import Networks
from midnight_train.method.schedules import Schedules
from midnight_train.method.student_teacher import DTensor, EMAPairs, apply_schedule, ema_update

LOSS_TERMS = ("loss", "loss_dino", "loss_ibot", "loss_kde", "loss_koleo")
# Wall-clock metrics: they differ between otherwise identical runs.
TIMING_METRICS = ("samples_per_s", "step_s", "data_wait_s")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


@dataclass
class StepResult:
    metrics: dict[str, Any]  # empty on steps that are not logged
    step_s: float
    data_wait_s: float  # summed over micro-steps, mean over processes
    stop_agreed: bool  # a stop signal reached some process: every process stops after this step


class TrainStep:
    """``TrainStep(...)(batches, step, ...)`` runs optimiser step ``step + 1``."""

    def __init__(self, cfg: TrainConfig, acc, nets: Networks, schedules: Schedules, augment,
                 generator: torch.Generator, *, fsdp: bool, global_batch: int,
                 output_dir: Path):
        self.cfg, self.acc, self.nets, self.schedules = cfg, acc, nets, schedules
        self.augment, self.generator = augment, generator
        self.fsdp, self.global_batch, self.output_dir = fsdp, global_batch, output_dir
        # Built once: per-step EMA is one multi-tensor op, without re-pairing parameters by name.
        self.ema_pairs = EMAPairs(nets.teacher, acc.unwrap_model(nets.student))

    def __call__(self, batches, step: int, *, stop_requested, loader) -> StepResult:
        cfg, acc, nets = self.cfg, self.acc, self.nets
        values = self.schedules.at(step)
        apply_schedule(nets.optimizer, values.lr, values.wd, values.last_layer_frozen)
        nets.student.train()
        start = time.perf_counter()
        names: tuple[str, ...] = ()
        n_losses = 0
        summed: torch.Tensor | None = None
        totals: list[float] = []
        grad_norms: dict[str, torch.Tensor] = {}
        for _ in range(cfg.grad_accum):
            waiting = time.perf_counter()
            raw = next(batches)                                                  # batch
            waited = time.perf_counter() - waiting
            batch = self.augment(to_device(raw, acc.device), self.generator)    # augment
            with acc.accumulate(nets.student):
                losses, monitors = nets.objective(nets.student, nets.teacher,   # forward, losses
                                                  batch, values.teacher_temp, acc.autocast)
                names, n_losses = tuple(losses) + tuple(monitors), len(losses)
                # Reduced with the losses in the step's one collective: the seconds this process
                # waited for the batch, and 1 where a stop signal arrived (so that every process
                # stops after the same step).
                extra = [torch.full((1,), waited, device=acc.device),
                         torch.full((1,), float(stop_requested()), device=acc.device)]
                local = torch.cat([torch.stack([v.detach().float() for v in
                                                list(losses.values()) + list(monitors.values())]),
                                   *extra])
                reduced = acc.reduce(local, reduction="mean")  # one collective per micro-step
                summed = reduced if summed is None else summed + reduced
                if self.fsdp:  # reduce-scatter the gradients once, after the last micro-step
                    nets.student.set_requires_gradient_sync(acc.sync_gradients)
                acc.backward(losses["loss"])                                     # backward
                if acc.sync_gradients:
                    totals = summed.cpu().tolist()  # the step's one wait for the device
                    # Any non-finite micro-step makes the sum non-finite (nan/inf never cancel).
                    self._check_finite([v / cfg.grad_accum for v in totals[:n_losses]],
                                       names[:n_losses], step)
                    acc.unscale_gradients()  # fp16's loss scale, once for all parts
                    grad_norms = clip_per_part(                                  # clip
                        student_parts(acc.unwrap_model(nets.student)),
                        cfg.clip_grad if cfg.clip_grad > 0 else math.inf)
                nets.optimizer.step()                                            # step
                nets.optimizer.zero_grad(set_to_none=True)
        ema_update(nets.teacher, acc.unwrap_model(nets.student), values.teacher_momentum,  # EMA
                   self.ema_pairs)
        step += 1
        step_s = time.perf_counter() - start
        result = StepResult({}, step_s, totals[-2], totals[-1] > 0)
        if step % cfg.log_every and step != cfg.max_steps:                      # log
            return result
        metrics: dict[str, Any] = {"step": step}
        metrics.update({n: v / cfg.grad_accum for n, v in zip(names, totals[:-2], strict=True)})
        metrics.update(lr=values.lr, wd=values.wd, teacher_momentum=values.teacher_momentum,
                       teacher_temp=values.teacher_temp,
                       samples_per_s=self.global_batch / max(step_s, 1e-9), step_s=step_s,
                       data_wait_s=result.data_wait_s)
        metrics.update(norm_metrics(grad_norms))
        metrics.update(skip_counters(loader, acc.num_processes))
        result.metrics = metrics
        return result

    def _check_finite(self, values: list[float], names: tuple[str, ...], step: int) -> None:
        if all(math.isfinite(v) for v in values):
            return
        bad = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values, strict=True)
                        if not math.isfinite(v))
        last = checkpoint.latest(self.output_dir)
        raise NonFiniteLossError(
            f"non-finite loss at step {step + 1}: {bad}. Stopping without writing a "
            f"checkpoint; the last good one is {last or 'none'}. Try a lower train.base_lr, "
            f"a longer train.warmup_steps or mixed_precision=no.")


def student_parts(student) -> dict[str, list[torch.Tensor]]:
    """The student's parameters by the parts DINOv2 clips separately: backbone, DINO head and
    (when separate) iBOT head."""
    parts = {"backbone": student.backbone, "dino_head": student.dino_head,
             "ibot_head": student.ibot_head}
    return {name: [p for p in module.parameters() if p.requires_grad]
            for name, module in parts.items() if module is not None}


def clip_per_part(parts: dict[str, list[torch.Tensor]],
                  max_norm: float) -> dict[str, torch.Tensor]:
    """Clip each part's gradients to ``max_norm`` on its own, as DINOv2 (one global norm would
    let large head gradients shrink the backbone's update); returns each part's norm before
    clipping, as a device tensor (no wait for the device). Sharded (FSDP2), a norm covers all
    slices of the part."""
    norms = {}
    for name, params in parts.items():
        by_mesh: dict[Any, list[torch.Tensor]] = defaultdict(list)  # FSDP2: one group per mesh
        for p in params:
            if p.grad is not None:
                by_mesh[getattr(p.grad, "device_mesh", None)].append(p)
        per_mesh = [get_total_norm([p.grad for p in group]) for group in by_mesh.values()]
        per_mesh = [n.full_tensor() if isinstance(n, DTensor) else n for n in per_mesh]
        if not per_mesh:
            continue
        norm = torch.linalg.vector_norm(torch.stack(per_mesh))
        if math.isfinite(max_norm):
            for group in by_mesh.values():
                clip_grads_with_norm_(group, max_norm, norm)
        norms[name] = norm
    return norms


def norm_metrics(norms: dict[str, torch.Tensor]) -> dict[str, float]:
    """``grad_norm`` (all parts together) and ``grad_norm_<part>``, in one copy to the host."""
    if not norms:
        return {}
    values = torch.stack([n.float() for n in norms.values()]).cpu().tolist()
    out = {"grad_norm": math.sqrt(sum(v * v for v in values))}
    out.update({f"grad_norm_{name}": v for name, v in zip(norms, values, strict=True)})
    return out


def skip_counters(loader, world_size: int) -> dict[str, int]:
    """The loader's skipped-sample counts by reason, summed over processes."""
    counters = getattr(loader, "counters", None)
    local = dict(counters()) if callable(counters) else {}
    total: dict[str, int] = {}
    for part in (gather_object([local]) if world_size > 1 else [local]):
        for reason, n in part.items():
            total[f"skipped_{reason}"] = total.get(f"skipped_{reason}", 0) + int(n)
    return total

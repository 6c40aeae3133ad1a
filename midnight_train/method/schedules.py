"""Training schedules as pure functions of the OPTIMISER step (never the micro-step: with gradient
accumulation N, counting micro-steps would run every schedule N times too fast). Being pure, they
need no state in checkpoints beyond the step itself."""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``), constant after."""
    if total <= 0:
        return end
    t = min(max(step, 0), total) / total
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, peak: float, end: float, warmup: int) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then cosine to ``end`` at ``total``."""
    if step < warmup:
        return peak * step / warmup
    return cosine(step - warmup, total - warmup, peak, end)


LR_BATCH_RULES = ("dinov2", "accumulated")


def lr_batch(batch_per_process: int, processes: int, grad_accum: int, rule: str = "dinov2") -> int:
    """The batch the lr is scaled for. ``dinov2``: batch per GPU x GPUs, as DINOv2's code counts
    it (it has no accumulation); ``accumulated``: x gradient accumulation too, the batch one
    optimiser step averages over."""
    if rule == "dinov2":
        return batch_per_process * processes
    if rule == "accumulated":
        return batch_per_process * processes * grad_accum
    raise ValueError(f"unknown lr batch rule {rule!r} ({', '.join(LR_BATCH_RULES)})")


def scaled_lr(base_lr: float, batch: int, rule: str = "sqrt", reference: int = 1024) -> float:
    """DINOv2's rule: lr = base_lr * sqrt(batch / 1024) (``linear`` and ``none`` for ablations),
    ``batch`` as ``lr_batch`` counts it."""
    if rule == "sqrt":
        return base_lr * math.sqrt(batch / reference)
    if rule == "linear":
        return base_lr * batch / reference
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r} (sqrt, linear, none)")


@dataclass(frozen=True)
class StepValues:
    lr: float
    wd: float
    teacher_momentum: float
    teacher_temp: float
    last_layer_frozen: bool


@dataclass(frozen=True)
class Schedules:
    total_steps: int
    peak_lr: float
    min_lr: float
    warmup_steps: int
    wd: float
    wd_end: float
    momentum: float
    momentum_end: float
    teacher_temp: float
    teacher_temp_start: float
    teacher_temp_warmup_steps: int
    freeze_last_layer_steps: int

    def at(self, step: int) -> StepValues:
        """Values for optimiser step ``step`` (0-based: the first update uses ``at(0)``)."""
        if step < self.teacher_temp_warmup_steps:
            frac = step / self.teacher_temp_warmup_steps
            temp = self.teacher_temp_start + frac * (self.teacher_temp - self.teacher_temp_start)
        else:
            temp = self.teacher_temp
        return StepValues(
            lr=warmup_cosine(step, self.total_steps, self.peak_lr, self.min_lr, self.warmup_steps),
            wd=cosine(step, self.total_steps, self.wd, self.wd_end),
            teacher_momentum=cosine(step, self.total_steps, self.momentum, self.momentum_end),
            teacher_temp=temp,
            last_layer_frozen=step < self.freeze_last_layer_steps,
        )

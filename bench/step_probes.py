"""What ``bench/train_step.py`` records besides step time: the attention kernel SDPA chose, the
host syncs of one step (on a GPU), and the step on real tiles through ColorAugment, timed."""

from __future__ import annotations

import collections
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from midnight_train.config import TrainConfig


class AttentionOps(TorchDispatchMode):
    """Counts, while active, the attention ops the dispatcher runs: the kernel SDPA chose
    (``_scaled_dot_product_flash_attention`` etc.; the math fallback has none of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "attention" in name:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


# aten op name fragment -> backend; the first match wins (the CPU kernel also says "flash").
SDPA_BACKENDS = (("cudnn", "cudnn"), ("for_cpu", "cpu"), ("flash", "flash"),
                 ("efficient", "mem-efficient"))


def sdpa_backend(step, gpu: bool) -> dict:
    """Which attention kernel one step ran, and which SDPA backends torch has enabled."""
    with AttentionOps() as seen:
        step()
    chosen = {next((backend for key, backend in SDPA_BACKENDS if key in op), op)
              for op in seen.ops}
    result = {"sdpa": "+".join(sorted(chosen)) or "math", "sdpa_ops": dict(seen.ops)}
    if gpu:
        flags = {name: getattr(torch.backends.cuda, f"{name}_sdp_enabled", lambda: None)()
                 for name in ("flash", "mem_efficient", "cudnn", "math")}
        result["sdpa_enabled"] = [name for name, on in flags.items() if on]
    return result


SYNC_WARNING = "synchroniz"  # torch: "called a synchronizing CUDA operation"


def host_syncs(step, train_cfg: TrainConfig) -> dict:
    """Host syncs of one step that logs no metrics and of one that does (``log_every``), as
    torch.cuda's sync debug mode warns of them: each warning is one wait of the host for the
    GPU. Run after warm-up (lazy initialisation is not a step)."""
    saved = train_cfg.log_every
    counts = {}
    for key, log_every in (("host_syncs", 10**9), ("host_syncs_logged", 1)):
        train_cfg.log_every = log_every
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            train_cfg.log_every = saved
        counts[key] = sum(SYNC_WARNING in str(w.message) for w in caught)
    return counts


# ----------------------------------------------------------------------------- real tiles


class RealBatches:
    """A few batches of the training loader on the shards in ``shards`` (uint8 crops, masks, as
    the loader yields them), handed out in turn: the step sees real input without waiting for
    JPEG decoding, which the pipeline check measures on its own."""

    def __init__(self, shards: Path, data: Any, n_batches: int = 4):
        """``data``: the crops and batch size (train_step's ``BenchData``)."""
        from midnight_train.data.config import DataConfig
        from midnight_train.data.loader import make_loader

        cfg = DataConfig(shards=str(shards), batch_size=data.batch_size, num_workers=0,
                         shuffle_buffer=200, global_crop_size=data.global_crop_size,
                         local_crop_size=data.local_crop_size, n_local_crops=data.n_local_crops,
                         patch_size=data.patch_size)
        loader = iter(make_loader(cfg, seed=0, rank=0, world_size=1))
        self.batches = [next(loader) for _ in range(n_batches)]
        self.served = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.served += 1
        return self.batches[self.served % len(self.batches)]

    def counters(self):
        return {}


class TimedAugment:
    """ColorAugment as the train step calls it, timed per call: by CUDA events on a GPU (the
    augmentation's time on the stream, gaps while the host launches its kernels included: the
    step waits for those too), by the wall clock on the CPU."""

    def __init__(self, augment, gpu: bool):
        self.augment, self.gpu = augment, gpu
        self.marks: list[tuple[Any, Any]] = []

    def _mark(self):
        if not self.gpu:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def __call__(self, batch, generator):
        begin = self._mark()
        out = self.augment(batch, generator)
        self.marks.append((begin, self._mark()))
        return out

    def seconds(self, last: int) -> list[float]:
        """The last ``last`` calls' seconds (on a GPU: read after a synchronize)."""
        if self.gpu:
            return [a.elapsed_time(b) / 1e3 for a, b in self.marks[-last:]]
        return [b - a for a, b in self.marks[-last:]]

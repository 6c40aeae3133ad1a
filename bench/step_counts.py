"""What one training step asks of the host and the network, counted on the CPU (no GPU needed):

- host syncs: the operations that make the host wait for a GPU (``.item()``/``bool()``/
  ``float()`` of a tensor, ``nonzero``, ``masked_select``, boolean-mask indexing, ``.cpu()``,
  ``.tolist()``), counted by a ``TorchDispatchMode`` plus the tensor methods that copy to the
  host, per phase of a step of the real trainer (tiny ViT);
- collectives: every c10d operation (all-gather, reduce-scatter, all-reduce, ...) of one FSDP
  step in a 2-process gloo run, with the bytes all-gathered, for each FSDP layout.

    python bench/step_counts.py syncs
    python -m torch.distributed.run --nproc_per_node 2 bench/step_counts.py collectives

Each prints one JSON line (the last line). On a GPU, ``bench/gpu_check.py`` counts the real
syncs with ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

aten = torch.ops.aten
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default,
             aten.masked_select.default, aten.nonzero_static.default}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
_HOST_METHODS = ("cpu", "tolist")


class HostSyncs(TorchDispatchMode):
    """Counts, while active, what would make the host wait for a GPU (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_OPS:
            self.counts[func.overloadpacket.__name__] += 1
        elif func in _INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                        for i in (args[1] or [])):
            self.counts["boolean-mask indexing"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in _HOST_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *a, _name=name, _original=original, **k):
                self.counts[f".{_name}()"] += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Collectives(TorchDispatchMode):
    """Counts c10d operations by name, and the bytes of the all-gathers' outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.gathered_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            name = func.overloadpacket.__name__.strip("_")
            self.counts[name] += 1
            if "allgather" in name and isinstance(args[0], torch.Tensor):
                self.gathered_bytes += args[0].numel() * args[0].element_size()
        return func(*args, **(kwargs or {}))


def tiny_trainer(out: str, **train):
    from train_fakes import make_trainer, tiny_config

    trainer = make_trainer(tiny_config(out, train={"max_steps": 10, "log_every": 5, **train}))
    trainer.loader = trainer._make_loader(trainer.cfg.data, seed=0, rank=trainer.rank,
                                          world_size=trainer.world_size)
    return trainer


def step(trainer, batches, index: int):
    return trainer.train_step(batches, index, stop_requested=lambda: False,
                              loader=trainer.loader)


def count_syncs() -> dict:
    """Host syncs per phase of a real step (tiny ViT, ColorAugment with every branch live)."""
    from midnight_train.loop.step import to_device
    from midnight_train.method.augment import AugmentConfig, ColorAugment

    trainer = tiny_trainer(tempfile.mkdtemp(prefix="syncs-"))
    trainer.train_step.augment = augment = ColorAugment(AugmentConfig(hed_p=0.5))
    batches = iter(trainer.loader)
    step(trainer, batches, 0)  # warm-up: lazy initialisation is not a step
    result = {}
    raw = to_device(next(batches), trainer.accelerator.device)
    with HostSyncs() as counted:
        batch = augment(raw, trainer.aug_generator)
    result["augment"] = dict(counted.counts)
    student = trainer.accelerator.unwrap_model(trainer.student)
    with HostSyncs() as counted:
        losses, _ = trainer.objective(student, trainer.teacher, batch, 0.07)
        losses["loss"].backward()
    result["forward_losses_backward"] = dict(counted.counts)
    student.zero_grad(set_to_none=True)
    with HostSyncs() as counted:
        step(trainer, batches, 1)  # not a logged step (log_every 5)
    result["step"] = dict(counted.counts)
    with HostSyncs() as counted:
        step(trainer, batches, 4)  # a logged step
    result["logged_step"] = dict(counted.counts)
    trainer.close()
    return result


def count_collectives() -> dict:
    """Collectives of one FSDP step per layout, on every process of a torchrun launch."""
    import torch.distributed as dist

    result = {}
    out = tempfile.mkdtemp(prefix="collectives-")
    layouts = {"regathered": {"fsdp_keep_gathered": False},
               "kept_gathered": {"fsdp_keep_gathered": True},
               "hybrid_kept_gathered": {"fsdp_keep_gathered": True, "fsdp_shard_size": 1}}
    trainer = None
    for name, options in layouts.items():
        trainer = tiny_trainer(f"{out}/{name}", fsdp=True, **options)
        batches = iter(trainer.loader)
        step(trainer, batches, 0)
        with Collectives() as counted:
            step(trainer, batches, 1)
        result[name] = {"ops": dict(sorted(counted.counts.items())),
                        "gathered_bytes": counted.gathered_bytes}
        dist.barrier()
    if trainer is not None:
        trainer.close()
    return result


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    what = sys.argv[1] if len(sys.argv) > 1 else "syncs"
    counts = count_syncs() if what == "syncs" else count_collectives()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"torch": torch.__version__, what: counts}), flush=True)


if __name__ == "__main__":
    main()

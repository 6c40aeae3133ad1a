"""GPU memory of one training step of a config, traced on fake tensors (no GPU, nothing
allocated): torch's ``FakeTensorMode`` runs the real student/teacher/objective step and its
``MemTracker`` sorts every tensor alive at the peak into parameters, gradients, optimiser state,
activations and temporaries; ``FlopCounterMode`` counts the FLOPs the device runs (recomputed
forwards included). Side by side: with and without activation checkpointing.

    python bench/step_memory.py examples/midnight-12k.yaml            # ViT-g/14, batch 12
    python bench/step_memory.py examples/tiny-cpu.yaml data.batch_size=4   # any config + overrides

The step is one process's micro-step as a GPU runs it: bf16 autocast (the CPU's autocast on
fake tensors; the same casts as CUDA's for matmuls, the same flash-style attention that keeps
no score matrix), teacher forward on the global crops, student forward on global + local crops,
the losses, backward, and AdamW. Everything replicated on one process (no sharding: under FSDP
the parameters, gradients and optimiser state divide by the shard size; activations do not).
Prints one JSON line (the last line); BENCHMARKS.md ("Training step memory") has the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from midnight_train.config import load_config  # noqa: E402
from midnight_train.data.masking import batch_masks, masked_positions  # noqa: E402
from midnight_train.method.objective import SSLObjective  # noqa: E402
from midnight_train.method.student_teacher import build_student_teacher, param_groups  # noqa: E402

MIB = 2**20


def real_batch(cfg) -> dict[str, torch.Tensor]:
    """Shapes and masks as the loader makes them (masks drawn as training draws them)."""
    d = cfg.data
    b, g, loc = d.batch_size, d.global_crop_size, d.local_crop_size
    masks = batch_masks(np.random.default_rng(0), 2 * b, g // d.patch_size,
                        sample_probability=d.mask_sample_probability,
                        ratio_min_max=tuple(d.mask_ratio_min_max),
                        max_fraction=d.mask_max_fraction, min_patches=d.mask_min_patches)
    indices, weights = masked_positions(masks)
    return {"global_crops": torch.zeros(2 * b, 3, g, g),
            "local_crops": torch.zeros(d.n_local_crops * b, 3, loc, loc),
            "masks": torch.from_numpy(masks), "mask_indices": torch.from_numpy(indices),
            "mask_weights": torch.from_numpy(weights)}


def traced_step(cfg, checkpointing: bool, bf16: bool) -> dict:
    """Peak memory of one step by category (MiB), on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    cfg.model.pretrained = None  # the weights' values do not change the memory
    cfg.model.grad_checkpointing = checkpointing
    batch = real_batch(cfg)
    with torch.device("meta"):  # built without values, then given fake storage on the CPU
        student, teacher = build_student_teacher(cfg.model)
        objective = SSLObjective(cfg.model, cfg.loss)
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        for module in (student, teacher, objective):
            module.to_empty(device="cpu")
        tc = cfg.train
        optimizer = torch.optim.AdamW(
            param_groups(student, tc.layerwise_decay, tc.patch_embed_lr_mult), lr=1e-4,
            foreach=True)
        batch = {k: fake.from_tensor(v) for k, v in batch.items()}
        # MemTracker hooks every parameter's gradient; the teacher runs under no_grad, so this
        # adds no gradient and no graph, only the hook it insists on.
        teacher.requires_grad_(True)

        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

        def forward_backward():
            losses, _ = objective(student, teacher, batch, 0.07, autocast=autocast)
            losses["loss"].backward()

        # Two phases, each with its own peak: what activation checkpointing changes, and the
        # optimiser's step (its state is made at the first step).
        phases = {}
        for name, work in (("forward_backward", forward_backward),
                           ("optimizer_step", optimizer.step)):
            tracker = MemTracker()
            tracker.track_external(student, teacher, objective, optimizer)
            with tracker:
                work()
            phases[name] = by_category(next(iter(tracker.get_tracker_snapshot("peak").values())))
        # FLOPs in a pass of their own: the counter's module hooks keep activations alive, which
        # would show as memory. Recomputed forwards included: what the device runs.
        with FlopCounterMode(display=False) as flops:
            forward_backward()
        phases["forward_backward"]["gflop_per_sample"] = round(
            flops.get_total_flops() / cfg.data.batch_size / 1e9, 1)
    return {**phases, "peak_mib": max(p["total"] for p in phases.values())}


def by_category(peak: dict[str, int]) -> dict[str, int]:
    parts = {name: round(peak.get(key, 0) / MIB) for name, key in (
        ("parameters", "Parameter"), ("buffers", "Buffer"), ("gradients", "Gradient"),
        ("optimizer", "Optstate"), ("activations", "Activation"), ("temporaries", "Temp"),
        ("other", "Other"))}
    return {**parts, "total": round(peak.get("Total", sum(peak.values())) / MIB)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value, as fit takes them")
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = ap.parse_args()
    rows = {}
    for checkpointing in (True, False):
        cfg = load_config(args.config, args.overrides)
        started = time.perf_counter()
        rows["checkpointing" if checkpointing else "no_checkpointing"] = {
            **traced_step(cfg, checkpointing, bf16=not args.fp32),
            "trace_s": round(time.perf_counter() - started, 1)}
    d, m = cfg.data, cfg.model
    print(json.dumps({
        "torch": torch.__version__, "config": args.config, "overrides": args.overrides,
        "arch": m.arch, "batch_per_process": d.batch_size,
        "crops": f"2 x {d.global_crop_size} + {d.n_local_crops} x {d.local_crop_size}",
        "prototypes": m.head_n_prototypes, "separate_ibot_head": m.ibot_separate_head,
        "precision": "fp32" if args.fp32 else "bf16 autocast", "layout": "1 process, replicated",
        **rows}), flush=True)


if __name__ == "__main__":
    main()

"""Student+teacher training-step time, throughput, peak memory and model FLOP/s (MFU on a GPU),
side by side with the bare backbone forward+backward of the same crops as the baseline.

    python bench/train_step.py                 # CPU: ViT-S/14 and ViT-B/14, batch 4
    python bench/train_step.py --quick         # the same, fewer steps
    python bench/train_step.py --gpu           # GPU: ViT-B/14 batch 64 (bf16), ViT-g/14 batch 12
                                               #      (bf16, activation checkpointing), MFU
    python bench/train_step.py --arch vit_base_patch14_dinov2 --batch 8 --steps 5   # one row
    python bench/train_step.py --arch vit_giant_patch14_dinov2 --batch 12 --checkpointing \
        --prototypes 131072 --fsdp --steps 100 --max-seconds 60   # one row, FSDP, time-capped
    python bench/train_step.py --arch vit_giant_patch14_dinov2 --batch 12 --checkpointing \
        --fsdp --variants default,augment,reshard,no-ckpt --data SHARDS   # 4 rows, one build

Two rows per model, each in its own process (so that the peak memory is its own):

- ``train step``: one full optimiser step of the real trainer (teacher forward on 2 global crops,
  student forward + backward on 2 global + N local crops, DINO + iBOT + KDE losses with the
  65k/131k-prototype heads and Sinkhorn-Knopp, gradient clipping, AdamW, EMA, metrics) on a
  synthetic batch already on the device, so the data pipeline is not part of the figure.
- ``backbone only``: the same backbone work without heads, losses, optimiser or EMA: the teacher
  backbone forward on the global crops and the student backbone forward + backward on all crops
  (same masks, drop path, precision and checkpointing). ``x backbone`` = step time / this time:
  everything above 1 is the cost of the SSL machinery.

``--variants`` measures several configurations of one built model in one process (a ViT-g build
is a large part of a time-boxed GPU check), one JSON line each as it finishes (``VARIANTS``):
activation checkpointing on or off (timm's ``set_grad_checkpointing``), the student's FSDP units
kept gathered from forward to backward or resharded after each forward
(``train.fsdp_keep_gathered``, switched by FSDP2's ``set_reshard_after_forward``), and the step
on real uint8 tiles from the shards in ``--data`` passed through ``ColorAugment`` on the device
inside the step, as training runs it (the augmentation's share of the step timed by CUDA events
around it). A configuration that runs out of GPU memory gives a row with ``"oom": true`` and
the next one still runs. Peak memory is reset before each, but the allocator has seen the
earlier ones (a fresh process can come out a little lower).

Step time is the median of ``--steps`` steps after ``--warmup`` steps. Model FLOPs per step are
counted by torch's FlopCounterMode (student forward + backward incl. heads, teacher forward;
matmuls, convolutions and attention; without the recomputation of activation checkpointing), one
sample at a time so that even ViT-g needs no activation memory for it; counted once more with
checkpointing on, they include the recomputed forwards (the FLOPs the hardware does). MFU =
model FLOP/s / the GPU's dense bf16 peak; ``mfu_recompute`` the same with the recomputation.
Peak memory is the process's peak RSS on CPU and ``torch.cuda.max_memory_allocated`` /
``max_memory_reserved`` on a GPU.

The first configuration also records which attention kernel SDPA chose in the step (the aten op
the dispatcher ran: flash, mem-efficient, cuDNN, the CPU kernel, or none = math) and, on a GPU,
the host syncs of one step (``torch.cuda.set_sync_debug_mode("warn")``, warnings counted), both
for a step that logs metrics and for one that does not.

On a shared CPU, run with as many threads as there are idle cores (``OMP_NUM_THREADS``): OpenMP
threads that have to wait for a core make every op as slow as a scheduler time slice, so the step
time then grows with the number of ops instead of the FLOPs (ViT-S and ViT-B look alike).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# bench/step_probes.py (this script's folder is on sys.path)
from step_probes import RealBatches, TimedAugment, host_syncs, sdpa_backend  # noqa: E402

from midnight_train.config import Config, TrainConfig  # noqa: E402
from midnight_train.data.masking import masked_positions  # noqa: E402
from midnight_train.loop.step import LOSS_TERMS  # noqa: E402
from midnight_train.method.models import Backbone, ModelConfig  # noqa: E402
from midnight_train.method.objective import LossConfig  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s; the first matching name wins.
BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0), ("A10", 125.0)]


def mask_fields(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """``masks`` with the masked positions the loader hands over beside them."""
    indices, weights = masked_positions(masks.numpy())
    return {"masks": masks, "mask_indices": torch.from_numpy(indices),
            "mask_weights": torch.from_numpy(weights)}


@dataclass
class BenchData:
    batch_size: int
    global_crop_size: int = 224
    local_crop_size: int = 98
    n_local_crops: int = 8
    patch_size: int = 14


class SyntheticLoader:
    """The same batch every time (on the training device after ``to_device``)."""

    def __init__(self, cfg: BenchData, *, seed: int, rank: int, world_size: int, state=None):
        g = torch.Generator().manual_seed(seed)
        b, gs, ls = cfg.batch_size, cfg.global_crop_size, cfg.local_crop_size
        n = (gs // cfg.patch_size) ** 2
        masks = torch.rand(2 * b, n, generator=g) < 0.3
        masks[::2] = False  # half of the images unmasked, as DINOv2
        self.batch = {"global_crops": torch.randn(2 * b, 3, gs, gs, generator=g),
                      "local_crops": torch.randn(cfg.n_local_crops * b, 3, ls, ls, generator=g),
                      **mask_fields(masks)}

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch

    def state_dict(self):
        return {}

    def counters(self):
        return {}


def identity_augment(batch, generator):
    return batch


# ----------------------------------------------------------------------------- FLOPs


def _flop_counter():
    """FlopCounterMode that also counts the CPU flash-attention kernels (torch counts only the
    CUDA ones), so that CPU and GPU figures mean the same."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(q, k, v, *args, out_shape=None, **kwargs):
            return fc.sdpa_flop_count(q, k, v)

        def bwd(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return fc.sdpa_backward_flop_count(grad_out, q, k, v)

        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def per_sample(batch: dict, b: int):
    """Sample j's rows of a multi-crop batch (crop-major layout: row ``c * b + j`` is crop c of
    sample j). Every model FLOP is per row, so the per-sample counts add up to the batch's."""
    n_local = batch["local_crops"].shape[0] // b
    for j in range(b):
        fields = mask_fields(batch["masks"][j::b].cpu())
        yield {"global_crops": batch["global_crops"][j::b],
               **{k: v.to(batch["masks"].device) for k, v in fields.items()},
               "local_crops": batch["local_crops"][j::b] if n_local else batch["local_crops"][:0]}


def count_flops(work, batch: dict, b: int, vit, *, checkpointing: bool = False) -> float:
    """One step's FLOPs of ``work``: model FLOPs, or with ``checkpointing`` also the forwards
    that activation checkpointing recomputes in backward (what the hardware does)."""
    saved = vit.grad_checkpointing
    vit.set_grad_checkpointing(checkpointing)
    try:
        with _flop_counter() as counter:
            for one in per_sample(batch, b):
                work(one)
    finally:
        vit.set_grad_checkpointing(saved)
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- one model


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS if k in name), None)


# --tiny: the same code path with a 2-block 64-d ViT and small heads (a dry run on the CPU).
TINY = {"timm_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0},
        "head_hidden_dim": 128}

# --variants: what each configuration changes from the command line's (``default``).
VARIANTS = {"default": {}, "ckpt": {"checkpointing": True}, "no-ckpt": {"checkpointing": False},
            "reshard": {"keep_gathered": False}, "augment": {"real_batch": True}}


def build_config(args, gpu: bool, data: BenchData) -> Config:
    giant = "giant" in args.arch
    return Config(
        output_dir=tempfile.mkdtemp(prefix="bench-train-"), data=data,
        model=ModelConfig(arch=args.arch, img_size=args.global_size, drop_path_rate=0.1,
                          grad_checkpointing=args.checkpointing,
                          head_n_prototypes=args.prototypes, ibot_separate_head=giant,
                          ibot_n_prototypes=args.prototypes,
                          head_bottleneck_dim=384 if giant else 256,
                          ibot_bottleneck_dim=256,
                          **(TINY if args.tiny else {})),
        loss=LossConfig(kde_weight=0.05),
        train=TrainConfig(max_steps=1000, tensorboard=False, progress=False, cpu=not gpu,
                          mixed_precision="bf16" if gpu else "no", fsdp=args.fsdp))


def bench_data(args) -> BenchData:
    return BenchData(batch_size=args.batch, global_crop_size=args.global_size,
                     local_crop_size=args.local_size, n_local_crops=args.n_local)


@dataclass
class Bench:
    """One built model: its step, its FLOPs, and the switches between configurations."""

    step: Callable[[], Any]  # one step on the synthetic device batch (train step: metrics)
    flops: dict[bool, float]  # one step's FLOPs without / with (True) recomputation
    vit: torch.nn.Module  # the student's timm ViT (activation checkpointing)
    student: torch.nn.Module  # the FSDP root when sharded
    train_cfg: TrainConfig | None = None  # the step's config (train step only)
    real_step: Callable[[], Any] | None = None  # a step on real tiles + ColorAugment
    augment_timer: TimedAugment | None = None
    optimizer: torch.optim.Optimizer | None = None


def count_both(work, batch: dict, b: int, vit, checkpointing: bool) -> dict[bool, float]:
    """Model FLOPs, and the hardware FLOPs with recomputation where some row checkpoints."""
    flops = {False: count_flops(work, batch, b, vit)}
    if checkpointing:
        flops[True] = count_flops(work, batch, b, vit, checkpointing=True)
    return flops


def setup_train_step(args, gpu: bool, checkpointing: bool) -> Bench:
    """The real trainer on the synthetic batch (and on real tiles when ``--data`` is given)."""
    from midnight_train.loop.trainer import Trainer

    data = bench_data(args)
    trainer = Trainer(build_config(args, gpu, data), make_loader=SyntheticLoader,
                      augment=identity_augment)
    trainer.loader = SyntheticLoader(data, seed=0, rank=0, world_size=1)
    batches = iter(trainer.loader)
    device_batch = {k: v.to(trainer.accelerator.device) for k, v in trainer.loader.batch.items()}
    student = trainer.accelerator.unwrap_model(trainer.student)

    def model_work(one):
        with trainer.accelerator.autocast():
            losses, _ = trainer.objective(student, trainer.teacher, one, 0.07)
        losses["loss"].backward()

    flops = count_both(model_work, device_batch, args.batch, student.backbone.vit, checkpointing)
    student.zero_grad(set_to_none=True)

    def step():
        return trainer.train_step(batches, 0, stop_requested=lambda: False,
                                  loader=trainer.loader).metrics

    bench = Bench(step, flops, student.backbone.vit, student, trainer.train_step.cfg,
                  optimizer=trainer.optimizer)
    if args.data:
        bench.real_step, bench.augment_timer = real_batch_step(trainer, args, gpu)
    return bench


def setup_backbone_only(args, gpu: bool, checkpointing: bool) -> Bench:
    """Teacher backbone forward (global crops) + student backbone forward + backward (all crops),
    nothing else."""
    data = bench_data(args)
    cfg = build_config(args, gpu, data)
    device = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    student = Backbone.from_config(cfg.model).to(device).train()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    batch = {k: v.to(device) for k, v in
             SyntheticLoader(data, seed=0, rank=0, world_size=1).batch.items()}
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else nullcontext

    def work(one):
        with autocast():
            with torch.no_grad():
                teacher(one["global_crops"])
            g = student(one["global_crops"], one["masks"])
            parts = [g.float().mean()]
            if one["local_crops"].numel():
                parts.append(student(one["local_crops"]).float().mean())
        sum(parts).backward()

    def step():
        work(batch)
        student.zero_grad(set_to_none=True)

    flops = count_both(work, batch, args.batch, student.vit, checkpointing)
    student.zero_grad(set_to_none=True)
    return Bench(step, flops, student.vit, student)


# ----------------------------------------------------------------------------- real tiles


def real_batch_step(trainer, args, gpu: bool):
    """(a train step on real tiles through ColorAugment on the device, its augment timer)."""
    from midnight_train.method.augment import AugmentConfig, ColorAugment

    real = RealBatches(args.data, bench_data(args))
    timer = TimedAugment(ColorAugment(AugmentConfig()), gpu)

    def step():
        trainer.train_step.augment = timer  # the step augments what the loader gave, as in fit
        try:
            return trainer.train_step(real, 0, stop_requested=lambda: False,
                                      loader=real).metrics
        finally:
            trainer.train_step.augment = identity_augment

    return step, timer


# ----------------------------------------------------------------------------- one row


def set_keep_gathered(student: torch.nn.Module, keep: bool) -> None:
    """``train.fsdp_keep_gathered`` at run time: the student's FSDP units keep their gathered
    weights from forward to backward, or reshard after each forward. The root is left as the
    trainer leaves it (FSDP's default for a root: never resharded after forward)."""
    from torch.distributed.fsdp import FSDPModule

    for module in student.modules():
        if isinstance(module, FSDPModule) and module is not student:
            module.set_reshard_after_forward(not keep, recurse=False)


def drop_step_memory(bench: Bench) -> None:
    """After an out-of-memory error mid-step: gradients, gathered weights and the allocator's
    cache go, so that the next configuration starts from the weights and optimiser state."""
    if bench.optimizer is not None:
        bench.optimizer.zero_grad(set_to_none=True)
    bench.student.zero_grad(set_to_none=True)
    for module in bench.student.modules():
        if hasattr(module, "reshard"):  # FSDP2 units the interrupted pass left gathered
            module.reshard()
    gc.collect()
    torch.cuda.empty_cache()


def time_steps(step, args, gpu: bool) -> dict:
    """``args.warmup`` steps, then up to ``args.steps`` timed ones (``--max-seconds``)."""
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    finite = True  # every loss term and the gradient norm of every step (train step mode)

    def check(metrics) -> None:
        nonlocal finite
        if isinstance(metrics, dict):
            values = [metrics[k] for k in (*LOSS_TERMS, "grad_norm") if k in metrics]
            finite = finite and all(math.isfinite(v) for v in values)

    for _ in range(args.warmup):
        check(step())
    sync()
    times = []
    began = time.perf_counter()
    for _ in range(args.steps):
        start = time.perf_counter()
        check(step())
        sync()
        times.append(time.perf_counter() - start)
        if args.max_seconds and time.perf_counter() - began > args.max_seconds:
            break  # enough for a median; keeps a time-boxed check in its box
    step_s = statistics.median(times)
    return {"finite": finite, "steps": len(times), "step_s": round(step_s, 4),
            "step_s_min": round(min(times), 4), "step_s_max": round(max(times), 4),
            "images_per_s": round(args.batch / step_s, 2)}


def describe(args, variant: str, checkpointing: bool, keep: bool, real: bool, gpu: bool) -> dict:
    device = torch.cuda.get_device_name() if gpu else "cpu"
    row = {"arch": args.arch, "mode": args.mode, "variant": variant, "device": device,
           "threads": torch.get_num_threads(), "batch": args.batch,
           "crops": f"2x{args.global_size} + {args.n_local}x{args.local_size}",
           "precision": "bf16" if gpu else "fp32", "checkpointing": checkpointing,
           "fsdp": args.fsdp, "prototypes": args.prototypes,
           "batch_source": "real tiles + ColorAugment" if real else "synthetic"}
    if args.fsdp:
        row["keep_gathered"] = keep
    return row


def tflop(flops: float) -> float:
    return float(f"{flops / 1e12:.4g}")  # 4 digits: a tiny dry-run model's too


def flop_figures(bench: Bench, row: dict, args, gpu: bool) -> dict:
    """FLOPs per step and MFU: model FLOPs, and with the recomputed forwards (hardware FLOPs)
    where this configuration checkpoints."""
    model = bench.flops[False]
    hardware = bench.flops[True] if row["checkpointing"] else model
    step_s = row["step_s"]
    out = {"tflop_per_step": tflop(model), "tflop_per_step_recompute": tflop(hardware),
           "achieved_tflops": tflop(model / step_s)}
    peak = (args.peak_tflops or peak_tflops(row["device"])) if gpu else None
    if peak:
        out.update(peak_tflops=peak, mfu=round(model / step_s / (peak * 1e12), 4),
                   mfu_recompute=round(hardware / step_s / (peak * 1e12), 4))
    return out


def measure(bench: Bench, args, gpu: bool, variant: str, probes: bool) -> dict:
    """One configuration of the built model: its row (``"oom": true`` if it did not fit)."""
    settings = VARIANTS[variant]
    checkpointing = settings.get("checkpointing", args.checkpointing)
    keep = settings.get("keep_gathered", True)
    real = settings.get("real_batch", False)
    row = describe(args, variant, checkpointing, keep, real, gpu)
    if real and bench.real_step is None:
        raise SystemExit(f"variant {variant}: needs --data (shards) and --mode step")
    bench.vit.set_grad_checkpointing(checkpointing)
    if args.fsdp:
        set_keep_gathered(bench.student, keep)
    step = bench.real_step if real else bench.step
    if gpu:
        torch.cuda.empty_cache()  # the reserved peak is this configuration's, not the last one's
        torch.cuda.reset_peak_memory_stats()
    oom = None
    try:
        row.update(time_steps(step, args, gpu))
    except torch.cuda.OutOfMemoryError as err:
        # Only the message outlives the except block: the traceback holds the step's tensors.
        oom = (str(err).splitlines() or ["CUDA out of memory"])[0][:200]
    if oom is not None:
        drop_step_memory(bench)
        return {**row, "oom": True, "error": oom}
    row.update(flop_figures(bench, row, args, gpu))
    if real:
        augment_s = statistics.median(bench.augment_timer.seconds(row["steps"]))
        row.update(augment_ms=round(augment_s * 1e3, 3),
                   augment_share=round(augment_s / row["step_s"], 4))
    if gpu:
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    else:
        row["peak_rss_gib"] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if probes:
        row.update(sdpa_backend(step, gpu))
        row.update(host_syncs(step, bench.train_cfg) if gpu and bench.train_cfg else
                   {"host_syncs": None, "host_syncs_logged": None})
    return row


def run_rows(args):
    """Build the model once, then yield one row per ``--variants`` configuration."""
    gpu = torch.cuda.is_available() and not args.cpu
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}: choose from {list(VARIANTS)}")
    checkpointing = any(VARIANTS[v].get("checkpointing", args.checkpointing) for v in variants)
    setup = setup_backbone_only if args.mode == "backbone" else setup_train_step
    bench = setup(args, gpu, checkpointing)
    for i, variant in enumerate(variants):
        yield measure(bench, args, gpu, variant, probes=i == 0)


# ----------------------------------------------------------------------------- suite


def short_name(arch: str) -> str:
    for size, short in (("small", "ViT-S/14"), ("base", "ViT-B/14"), ("large", "ViT-L/14"),
                        ("giant", "ViT-g/14")):
        if size in arch:
            return short + (" reg" if "reg" in arch else "")
    return arch


def markdown_table(rows: list[dict]) -> str:
    gpu = any("peak_mem_gib" in r for r in rows)
    head = ["model", "what", "batch", "precision", "step s (median)", "min-max s", "images/s",
            "x backbone", "TFLOP/step", "achieved TFLOP/s", "peak " + ("GPU mem" if gpu else "RSS")
            + " GiB"]
    if gpu:
        head.append("MFU")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["arch"]: r["step_s"] for r in rows if r["mode"] == "backbone"}
    for r in rows:
        ratio = r["step_s"] / base[r["arch"]] if r["arch"] in base else None
        prec = (r["precision"] + (" + ckpt" if r["checkpointing"] else "")
                + (" + FSDP" if r.get("fsdp") else ""))
        cells = [short_name(r["arch"]), "train step" if r["mode"] == "step" else "backbone only",
                 str(r["batch"]), prec, f"{r['step_s']:.3f}",
                 f"{r['step_s_min']:.3f}-{r['step_s_max']:.3f}", f"{r['images_per_s']:.2f}",
                 f"{ratio:.2f}" if ratio else "-", f"{r['tflop_per_step']:.3f}",
                 f"{r['achieved_tflops']:.3f}",
                 f"{r.get('peak_mem_gib', r.get('peak_rss_gib', 0.0)):.2f}"]
        if gpu:
            cells.append(f"{r['mfu']:.1%}" if "mfu" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU suite (needs CUDA)")
    parser.add_argument("--quick", action="store_true", help="fewer warm-up and timed steps")
    parser.add_argument("--arch", help="one model (prints one JSON line per variant)")
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated configurations of that model, measured in one "
                             f"process in this order: {', '.join(VARIANTS)}")
    parser.add_argument("--data", type=Path,
                        help="shards for the 'augment' variant (real tiles + ColorAugment)")
    parser.add_argument("--mode", choices=["step", "backbone"], default="step")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (train.fsdp)")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-block 64-d ViT (checks the code path, e.g. on the CPU)")
    parser.add_argument("--max-seconds", type=float,
                        help="stop the timed steps after this long (at least one step)")
    parser.add_argument("--steps", type=int, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--peak-tflops", type=float, help="override the GPU's dense bf16 peak")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gpu_run = args.gpu or (args.arch is not None and torch.cuda.is_available() and not args.cpu)
    if args.steps is None:
        args.steps = (5 if args.quick else 10) if gpu_run else (2 if args.quick else 5)
    if args.warmup is None:
        args.warmup = (2 if args.quick else 3) if gpu_run else 1
    if args.arch:
        for row in run_rows(args):  # each row as soon as it is measured (a time box may end)
            print(json.dumps(row), flush=True)
        return

    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.peak_tflops:
        timing += ["--peak-tflops", str(args.peak_tflops)]
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
        suite = [["--arch", "vit_base_patch14_dinov2", "--batch", "64"],
                 ["--arch", "vit_giant_patch14_dinov2", "--batch", "12", "--checkpointing",
                  "--prototypes", "131072"]]
    else:
        shape = ["--batch", str(args.batch), "--global-size", str(args.global_size),
                 "--local-size", str(args.local_size), "--n-local", str(args.n_local),
                 "--prototypes", str(args.prototypes), "--cpu"]
        if args.checkpointing:
            shape.append("--checkpointing")
        suite = [["--arch", "vit_small_patch14_dinov2", *shape],
                 ["--arch", "vit_base_patch14_dinov2", *shape]]
    cores = os.cpu_count() or 1
    print(f"threads {os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())}, "
          f"{cores} cores, load average {os.getloadavg()[0]:.2f} before the run", flush=True)
    rows = []
    for extra in suite:
        for mode in ("backbone", "step"):  # one process each: its own peak memory
            out = subprocess.run([sys.executable, __file__, *extra, *timing, "--mode", mode],
                                 check=True, stdout=subprocess.PIPE, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    device = rows[0]["device"] + ("" if args.gpu else f", {rows[0]['threads']} threads")
    print(f"\n{device}; load average {os.getloadavg()[0]:.2f} after the run; median of "
          f"{args.steps} steps after {args.warmup} warm-up\n")
    print(markdown_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

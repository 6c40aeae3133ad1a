"""Student+teacher training-step time, throughput, peak memory and MFU.

    python bench/train_step.py                 # CPU: ViT-S/14 and ViT-B/14, small batch
    python bench/train_step.py --gpu           # GPU: ViT-B/14 batch 64, ViT-g/14 batch 12 (bf16,
                                               #      activation checkpointing), MFU vs bf16 peak
    python bench/train_step.py --arch vit_base_patch14_dinov2 --batch 8 --steps 5

One full optimiser step of the real trainer (teacher forward on 2 global crops, student forward +
backward on 2 global + N local crops, DINO + iBOT + KDE losses, AdamW, EMA) on synthetic batches
already on the device, so the data pipeline is not part of the figure. Each configuration runs in
its own process so that the peak memory is its own. MFU = model FLOPs per step (student forward +
backward, teacher forward; counted by torch's FlopCounterMode, without the recomputation of
activation checkpointing) / step time / the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from midnight_train.config import Config, LossConfig, TrainConfig  # noqa: E402
from midnight_train.models import ModelConfig  # noqa: E402

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


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
        masks[::2] = False
        self.batch = {"global_crops": torch.randn(2 * b, 3, gs, gs, generator=g),
                      "local_crops": torch.randn(cfg.n_local_crops * b, 3, ls, ls, generator=g),
                      "masks": masks}

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


def model_flops(trainer, batch) -> float:
    """FLOPs of one step's model work, counted at batch 1 and scaled (linear in the batch)."""
    from torch.utils.flop_counter import FlopCounterMode

    student = trainer.accelerator.unwrap_model(trainer.student)
    b = batch["global_crops"].shape[0] // 2
    n_local = batch["local_crops"].shape[0] // b
    one = {"global_crops": batch["global_crops"][:2], "local_crops": batch["local_crops"][:n_local],
           "masks": batch["masks"][:2]}
    saved = student.backbone.vit.grad_checkpointing
    student.backbone.vit.set_grad_checkpointing(False)
    try:
        with FlopCounterMode(display=False) as counter, trainer.accelerator.autocast():
            losses, _ = trainer.objective(student, trainer.teacher, one, 0.07)
            losses["loss"].backward()
        student.zero_grad(set_to_none=True)
    finally:
        student.backbone.vit.set_grad_checkpointing(saved)
    return float(counter.get_total_flops()) * b


def run_one(args) -> dict:
    from midnight_train.trainer import Trainer

    gpu = torch.cuda.is_available() and not args.cpu
    data = BenchData(batch_size=args.batch, global_crop_size=args.global_size,
                     local_crop_size=args.local_size, n_local_crops=args.n_local)
    cfg = Config(
        output_dir=tempfile.mkdtemp(prefix="bench-train-"), data=data,
        model=ModelConfig(arch=args.arch, img_size=args.global_size, drop_path_rate=0.1,
                          grad_checkpointing=args.checkpointing,
                          head_n_prototypes=args.prototypes,
                          ibot_separate_head="giant" in args.arch,
                          ibot_n_prototypes=args.prototypes,
                          head_bottleneck_dim=384 if "giant" in args.arch else 256),
        loss=LossConfig(kde_weight=0.1),
        train=TrainConfig(max_steps=1000, tensorboard=False, progress=False, cpu=not gpu,
                          mixed_precision="bf16" if gpu else "no"))
    trainer = Trainer(cfg, make_loader=SyntheticLoader, augment=identity_augment)
    trainer.loader = SyntheticLoader(data, seed=0, rank=0, world_size=1)
    batches = iter(trainer.loader)
    flops = model_flops(trainer, trainer.loader.batch) if args.flops else 0.0
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        trainer._train_step(batches)
    if gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer._train_step(batches)
    if gpu:
        torch.cuda.synchronize()
    step_s = (time.perf_counter() - start) / args.steps
    result = {"arch": args.arch, "device": torch.cuda.get_device_name() if gpu else "cpu",
              "threads": torch.get_num_threads(), "batch": args.batch,
              "crops": f"2x{args.global_size} + {args.n_local}x{args.local_size}",
              "bf16": gpu, "checkpointing": args.checkpointing, "step_s": round(step_s, 4),
              "images_per_s": round(args.batch / step_s, 2)}
    if gpu:
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if flops:
        result["tflops_per_step"] = round(flops / 1e12, 3)
        result["achieved_tflops"] = round(flops / step_s / 1e12, 2)
        name = result["device"]
        peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
        if gpu and peak:
            result["mfu"] = round(flops / step_s / (peak * 1e12), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU suite (needs CUDA)")
    parser.add_argument("--arch")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--n-local", type=int, default=8)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--flops", action="store_true", help="count FLOPs (MFU)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.arch:
        print(json.dumps(run_one(args)), flush=True)
        return
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu: no CUDA device")
        suite = [["--arch", "vit_base_patch14_dinov2", "--batch", "64", "--flops", "--steps", "10",
                  "--warmup", "3"],
                 ["--arch", "vit_giant_patch14_dinov2", "--batch", "12", "--checkpointing",
                  "--prototypes", "131072", "--flops", "--steps", "10", "--warmup", "3"]]
    else:
        common = ["--batch", str(args.batch), "--steps", str(args.steps), "--cpu", "--flops"]
        suite = [["--arch", "vit_small_patch14_dinov2", *common],
                 ["--arch", "vit_base_patch14_dinov2", *common]]
    for extra in suite:  # one process each: its own peak memory
        subprocess.run([sys.executable, __file__, *extra], check=True)


if __name__ == "__main__":
    main()

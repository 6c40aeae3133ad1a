"""The prepared GPU check (run by bench/gpu_check.sh, which says how): every figure the scale-out
work needs from one GPU, in one time-boxed run that writes one JSON and one Markdown table.

Checks, each in its own process (its own peak memory; a failure is recorded and the next check
runs):

1. ``vitb``: ViT-B/14 train steps (the data-parallel path), batch 64, bf16, 2 x 224 + 8 x 98 crops,
   65 536 prototypes, synthetic batch on the GPU (``bench/train_step.py``).
2. ``vitg``: ViT-g/14, FSDP on one GPU, bf16, activation checkpointing, batch 12, the paper's
   crops, 131 072 prototypes (separate iBOT head): step time, images/s, MFU against the card's
   dense bf16 peak (FLOPs counted as ``bench/train_step.py`` does), peak memory.
3. ``augment``: ``ColorAugment`` (HED, colour jitter, grey, blur, solarize, normalise) on the GPU
   on real crops from the shards: crops/s and its share of the ViT-g and ViT-B steps.
4. ``pipeline``: ``python -m midnight_train fit`` on the shards (ViT-B/14, batch 64, the paper's
   10 loader workers): images/s and the share of the step spent waiting for data; then export.
5. ``preempt``: ``accelerate launch --use_fsdp`` (ViT-S/14): SIGTERM to the launcher -> a sharded
   checkpoint and "preempted"; ``resume=auto`` runs to the end; export reads the shards.

Every train step's loss terms must stay finite. ``--cpu`` runs the same checks with tiny models
for a few steps on the CPU (a dry run of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"vitg_mfu": 0.40, "vitg_images_per_s": 60.0, "vitg_peak_gib": 80.0,
           "augment_share": 0.05, "data_wait_share": 0.05}
TINY = ["model.timm_kwargs={embed_dim: 64, depth: 2, num_heads: 2}", "model.img_size=56",
        "model.head_n_prototypes=256", "model.head_hidden_dim=128",
        "model.head_bottleneck_dim=64", "data.global_crop_size=56", "data.local_crop_size=28",
        "data.n_local_crops=2", "data.batch_size=4", "data.num_workers=2"]


# What the checks import, tried first in ~5 s (a missing wheel is one line, not five tracebacks).
PREFLIGHT_MODULES = ("torch", "timm", "accelerate", "safetensors", "yaml", "click", "tqdm",
                     "sklearn", "PIL", "numpy", "fsspec", "braceexpand", "midnight_train.config",
                     "midnight_train.data.loader", "midnight_train.method.augment", "midnight_train.loop.trainer",
                     "midnight_train.outputs.export", "midnight_train.cli")


def preflight_phase(args) -> None:
    """Import what the checks need and load the configs they use; one line on the first miss."""
    import importlib
    import traceback

    for name in PREFLIGHT_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:
            frames = [f for f in traceback.extract_tb(err.__traceback__)
                      if f.filename.startswith(str(ROOT)) and f.filename != __file__]
            where = (f" (imported at {Path(frames[-1].filename).relative_to(ROOT)}:"
                     f"{frames[-1].lineno})" if frames else "")
            sys.exit(f"gpu_check preflight: cannot import {name}: {type(err).__name__}: {err}"
                     f"{where}. Add its wheel to bench/gpu_check_wheels.txt (then "
                     f"bench/gpu_check.sh --prepare), or import it only where it is used")
    from midnight_train.config import load_config

    for example in ("vitb14-ablation.yaml", "tiny-cpu.yaml"):
        load_config(ROOT / "examples" / example, [f"data.shards={args.data}"])
    import torch

    if not args.cpu and not torch.cuda.is_available():
        sys.exit(f"gpu_check preflight: torch {torch.__version__} sees no CUDA device")
    print("preflight: imports and configs ok", flush=True)


def preflight(args) -> None:
    """``preflight_phase`` in a fresh process, before any check starts (~5 s)."""
    cmd = [sys.executable, __file__, "--phase", "preflight", "--data", str(args.data)]
    try:
        done = subprocess.run(cmd + (["--cpu"] if args.cpu else []), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        sys.exit("gpu_check preflight: importing torch, timm and midnight_train took over 60 s")
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        sys.exit(lines[-1] if lines else f"gpu_check preflight: exit {done.returncode}")
    print(done.stdout.strip(), flush=True)


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    print(f"$ {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
    sys.stdout.write(done.stdout[-4000:])
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr[-1500:]}")
    return done


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- checks


def train_step_row(args, extra: list[str], timeout: float) -> dict:
    base = [sys.executable, "bench/train_step.py", "--mode", "step"]
    if args.cpu:
        extra = [*extra, "--tiny", "--batch", "2", "--global-size", "56", "--local-size", "28",
                 "--n-local", "2", "--prototypes", "256", "--steps", "2", "--warmup", "1",
                 "--cpu"]
    return last_json(run([*base, *extra], timeout).stdout)


def check_vitb(args) -> dict:
    extra = ["--arch", "vit_base_patch14_dinov2"]
    if not args.cpu:
        extra += ["--batch", "64", "--steps", "200", "--warmup", "20", "--max-seconds", "30"]
    return train_step_row(args, extra, timeout=180)


def check_vitg(args) -> dict:
    extra = ["--arch", "vit_giant_patch14_dinov2", "--checkpointing", "--fsdp"]
    if not args.cpu:
        extra += ["--batch", "12", "--prototypes", "131072", "--steps", "150", "--warmup", "10",
                  "--max-seconds", "45"]
    return train_step_row(args, extra, timeout=300)


def check_augment(args) -> dict:
    cmd = [sys.executable, __file__, "--phase", "augment", "--data", str(args.data)]
    return last_json(run(cmd + (["--cpu"] if args.cpu else []), timeout=120).stdout)


def augment_phase(args) -> dict:
    """ColorAugment crops/s on real uint8 crops (the loader's own batches) at batch 12 and 64."""
    import torch

    from midnight_train.config import load_config
    from midnight_train.data.loader import make_loader
    from midnight_train.loop.step import to_device
    from midnight_train.method.augment import AugmentConfig, ColorAugment

    device = torch.device("cpu" if args.cpu else "cuda")
    sizes = [2] if args.cpu else [12, 64]
    overrides = [f"data.shards={args.data}", "data.num_workers=0", "data.shuffle_buffer=200"]
    if args.cpu:
        overrides += [o for o in TINY if o.startswith("data.") and "workers" not in o]
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    augment = ColorAugment(AugmentConfig(hed_p=1.0))
    generator = torch.Generator(device=device).manual_seed(0)
    for batch_size in sizes:
        cfg = load_config(ROOT / "examples" / "vitb14-ablation.yaml",
                          [*overrides, f"data.batch_size={batch_size}"])
        batch = to_device(next(iter(make_loader(cfg.data, seed=0, rank=0, world_size=1))), device)
        n_crops = batch["global_crops"].shape[0] * batch_size + batch["local_crops"].shape[0] * \
            batch_size
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(2 if args.cpu else 10):
            augment(batch, generator)
        sync()
        times = []
        for _ in range(3 if args.cpu else 50):
            start = time.perf_counter()
            augment(batch, generator)
            sync()
            times.append(time.perf_counter() - start)
        call_s = statistics.median(times)
        result[f"batch{batch_size}"] = {"crops": n_crops, "ms_per_batch": round(call_s * 1e3, 3),
                                        "crops_per_s": round(n_crops / call_s, 1)}
    return result


def metrics_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def fit_command(args, out: Path, *extra: str) -> list[str]:
    config = ROOT / "examples" / ("tiny-cpu.yaml" if args.cpu else "vitb14-ablation.yaml")
    common = [f"data.shards={args.data}", f"output_dir={out}", "train.tensorboard=false",
              "train.progress=false", "train.log_every=1", "train.grad_accum=1",
              "data.shuffle_buffer=500"]
    return [str(config), *common, *(TINY if args.cpu else []), *extra]


def check_pipeline(args, work: Path) -> dict:
    """The real CLI and data pipeline feeding the GPU: ViT-B/14, batch 64, 10 workers."""
    out = work / "pipeline"
    steps = 6 if args.cpu else 150
    extra = [] if args.cpu else ["data.batch_size=64", "data.num_workers=10"]
    run([sys.executable, "-m", "midnight_train", "fit",
         *fit_command(args, out, f"train.max_steps={steps}", "train.checkpoint_every=100000",
                      *extra)], timeout=60 if args.cpu else 300)
    rows = metrics_rows(out)
    steady = rows[min(10, len(rows) - 1):] if not args.cpu else rows[1:]
    step_s = statistics.median(r["step_s"] for r in steady)
    wait = sum(r["data_wait_s"] for r in steady) / sum(r["step_s"] for r in steady)
    finite = all(math.isfinite(r[k]) for r in rows for k in ("loss", "loss_dino", "loss_ibot",
                                                              "loss_kde", "grad_norm"))
    run([sys.executable, "-m", "midnight_train", "export", str(out), str(work / "export-vitb")],
        timeout=120)
    return {"model": "tiny ViT" if args.cpu else "ViT-B/14", "steps": len(rows),
            "batch": 4 if args.cpu else 64, "workers": 2 if args.cpu else 10,
            "step_s": round(step_s, 4), "images_per_s": round(steady[-1]["samples_per_s"], 1),
            "images_per_s_median": round(statistics.median(r["samples_per_s"] for r in steady), 1),
            "data_wait_share": round(wait, 4), "finite": finite, "export": "ok"}


def check_preempt(args, work: Path) -> dict:
    """accelerate launch --use_fsdp, SIGTERM to the launcher, resume=auto, export."""
    out = work / "preempt"
    steps = 60 if args.cpu else 40
    model = [] if args.cpu else ["model.arch=vit_small_patch14_dinov2", "data.batch_size=32",
                                 "data.num_workers=10"]
    fit = fit_command(args, out, f"train.max_steps={steps}", "train.checkpoint_every=100000",
                      *model)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp",
              "--fsdp_version", "2", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no" if args.cpu else "bf16", "--dynamo_backend", "no",
              "-m", "midnight_train", "fit"]
    print(f"$ {' '.join(launch + fit)}  (SIGTERM after 10 steps)", flush=True)
    proc = subprocess.Popen(launch + fit, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() or len(metrics_rows(out)) < 10:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the run ended before 10 steps: {proc.communicate()[1][-1500:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it on (torchrun: to the group)
    stdout, stderr = proc.communicate(timeout=120)
    said = stdout + stderr
    stopped_at = len(metrics_rows(out))
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    result = {"signal_exit": proc.returncode, "stopped_at": stopped_at,
              "preempted_message": "preempted, resume with resume=auto" in said,
              "sharded_files": sorted(p.name for p in checkpoints[-1].glob("shard_*"))
              if checkpoints else [], "fsdp_from": "accelerate launch --use_fsdp" in said}
    if not result["preempted_message"] or not checkpoints:
        raise RuntimeError(f"no preemption checkpoint: {json.dumps(result)}\n{said[-2000:]}")
    resumed = run(launch + fit + ["resume=auto"], timeout=300)
    rows = metrics_rows(out)
    result.update(resumed_from=f"step {checkpoints[-1].name[5:].lstrip('0')}",
                  resumed_ok=f"resumed from {checkpoints[-1]}" in resumed.stdout,
                  steps=[rows[0]["step"], rows[-1]["step"]],
                  contiguous=[r["step"] for r in rows] == list(range(1, steps + 1)))
    run([sys.executable, "-m", "midnight_train", "export", str(out), str(work / "export-fsdp")],
        timeout=120)
    result["export"] = "ok"
    return result


# ----------------------------------------------------------------------------- report


def verdict(value, target, higher: bool) -> str:
    if value is None:
        return "-"
    return "met" if (value >= target if higher else value < target) else "NOT met"


def step_label(r: dict) -> str:
    """What a train_step row measured, from the row itself (so a dry run says what it ran)."""
    name = {"base": "ViT-B/14", "giant": "ViT-g/14"}
    model = next((v for k, v in name.items() if k in r["arch"]), r["arch"])
    how = ["FSDP (1 process)" if r.get("fsdp") else "data-parallel path", r["precision"]]
    if r.get("checkpointing"):
        how.append("activation checkpointing")
    prototypes = f"{r['prototypes']:,}".replace(",", " ")
    return (f"{model} train step, {', '.join(how)}, batch {r['batch']}, crops {r['crops']}, "
            f"{prototypes} prototypes")


def markdown(results: dict) -> str:
    """The table for BENCHMARKS.md: one row per measurement, the targets' verdicts in notes."""
    c = results["checks"]
    lines = [f"{results['device']}, torch {results['torch']}, {results['when']}; "
             f"`bench/gpu_check.sh` ran {results['seconds']:.0f} s", "",
             "| check | step s | images/s | MFU | peak GiB | finite | notes |",
             "|---|---:|---:|---:|---:|---|---|"]

    def failed(name: str, r: dict) -> bool:
        if "error" in r:
            lines.append(f"| {name} | - | - | - | - | - | FAILED: {r['error'][:160]} |")
        return "error" in r

    for key, targets in (("vitb", False), ("vitg", True)):
        r = c.get(key)
        if r is None or failed(key, r):
            continue
        notes = f"{r['tflop_per_step']} TFLOP/step, {r['steps']} timed steps"
        if targets:
            notes += (f"; targets: MFU >= 40 % {verdict(r.get('mfu'), TARGETS['vitg_mfu'], True)}"
                      f", >= 60 images/s "
                      f"{verdict(r['images_per_s'], TARGETS['vitg_images_per_s'], True)}, "
                      f"< 80 GB {verdict(r.get('peak_mem_gib'), TARGETS['vitg_peak_gib'], False)}")
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        peak = r.get("peak_mem_gib", r.get("peak_rss_gib", "-"))
        lines.append(f"| {step_label(r)} | {r['step_s']:.3f} | {r['images_per_s']:.1f} | {mfu} "
                     f"| {peak} | {'yes' if r['finite'] else 'NO'} | {notes} |")
    a = c.get("augment")
    if a is not None and not failed("ColorAugment on the device", a):
        for key, r in a.items():
            if not key.startswith("batch"):
                continue
            model = "vitg" if key == "batch12" else "vitb"
            step = c.get(model, {}).get("step_s")
            aug_s = r["ms_per_batch"] / 1e3
            note = ""
            if step:
                share = aug_s / (step + aug_s)
                note = (f"{share:.1%} of a {'ViT-g' if model == 'vitg' else 'ViT-B'} step with "
                        f"it (target < 5 %: {verdict(share, TARGETS['augment_share'], False)})")
            lines.append(f"| ColorAugment (HED, colour, grey, blur, solarize), batch "
                         f"{key[5:]} = {r['crops']} crops | {aug_s:.4f} | "
                         f"{r['crops_per_s']:.0f} crops/s | - | - | - | {note} |")
    p = c.get("pipeline")
    if p is not None and not failed("full pipeline", p):
        lines.append(f"| `midnight_train fit` on real shards, {p['model']}, batch {p['batch']}, "
                     f"{p['workers']} loader workers, {p['steps']} steps | {p['step_s']:.3f} | "
                     f"{p['images_per_s_median']:.1f} | - | - | {'yes' if p['finite'] else 'NO'} "
                     f"| waiting for data: {p['data_wait_share']:.1%} of the step (target < 5 %: "
                     f"{verdict(p['data_wait_share'], TARGETS['data_wait_share'], False)}); "
                     f"export {p['export']} |")
    q = c.get("preempt")
    if q is not None and not failed("preemption", q):
        lines.append(f"| `accelerate launch --use_fsdp`: SIGTERM at step {q['stopped_at']} "
                     f"(exit {q['signal_exit']}), then resume=auto | - | - | - | - | - | "
                     f"checkpoint {', '.join(q['sharded_files'])}; steps {q['steps'][0]}-"
                     f"{q['steps'][1]} {'contiguous' if q['contiguous'] else 'NOT contiguous'}; "
                     f"export {q.get('export', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-check" / "out")
    parser.add_argument("--data", type=Path, default=ROOT / ".gpu-check" / "data")
    parser.add_argument("--cpu", action="store_true", help="dry run: tiny models on the CPU")
    parser.add_argument("--phase", choices=["augment", "preflight"], help=argparse.SUPPRESS)
    parser.add_argument("--only", help="comma-separated checks to run (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase == "augment":
        print(json.dumps(augment_phase(args)), flush=True)
        return
    if args.phase == "preflight":
        preflight_phase(args)
        return

    began = time.perf_counter()
    preflight(args)
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu and not args.cpu:
        sys.exit("gpu_check: no CUDA device (use --cpu for a dry run)")
    device = torch.cuda.get_device_name() if gpu else f"CPU dry run ({platform.node()})"
    results = {"device": device, "torch": torch.__version__, "when": time.strftime("%Y-%m-%d"), "dry_run": args.cpu,
               "targets": TARGETS, "checks": {}}
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    checks = {"vitb": check_vitb, "vitg": check_vitg, "augment": check_augment,
              "pipeline": lambda a: check_pipeline(a, work),
              "preempt": lambda a: check_preempt(a, work)}
    wanted = args.only.split(",") if args.only else list(checks)
    for name in wanted:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            results["checks"][name] = checks[name](args)
        except Exception as err:  # recorded; the next check still runs
            results["checks"][name] = {"error": f"{type(err).__name__}: {err}"[-2000:]}
        results["checks"][name]["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(results["checks"][name]), flush=True)
        results["seconds"] = time.perf_counter() - began
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    (args.out / "gpu_check.md").write_text(markdown(results))
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{markdown(results)}\nwrote {args.out / 'gpu_check.json'} and "
          f"{args.out / 'gpu_check.md'}", flush=True)
    failed = [name for name, r in results["checks"].items() if "error" in r]
    if failed:
        sys.exit(f"gpu_check: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

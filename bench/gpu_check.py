"""The prepared GPU check (run by bench/gpu_check.sh, which says how): every figure the scale-out
work needs from one GPU, in one time-boxed run that writes one JSON and one Markdown table.

Checks, each in its own process (its own peak memory; a failure is recorded and the next check
runs), most important first:

1. ``vitg``: ViT-g/14 on 1 GPU, no communication (FSDP in one process, so an upper bound, not
   the 32-GPU figure), bf16, batch 12, the paper's crops, 131 072 prototypes (separate iBOT
   head), one build measured in four configurations (``bench/train_step.py --variants``):
   as the ViT-g example configs train (no activation checkpointing, the student kept gathered
   from forward to backward; judged against the targets), the same step on real uint8 tiles
   from the shards through ``ColorAugment`` on the GPU inside the step (its share of the step),
   the student resharded after forward (``train.fsdp_keep_gathered=false``), and with
   activation checkpointing (what GPUs under 48 GB need). "OOM" where one does not fit. Step time, images/s, MFU without and with the
   recomputed forwards (FLOPs counted by torch's FlopCounterMode), allocated and reserved peak
   memory, the attention kernel SDPA chose and the host syncs of one step.
2. ``vitb``: ViT-B/14 train steps (the data-parallel path), batch 64, bf16, 2 x 224 + 8 x 98 crops,
   65 536 prototypes, synthetic batch on the GPU.
3. ``augment``: ``ColorAugment`` (HED, colour jitter, grey, blur, solarize, normalise) on the GPU
   on real crops from the shards: crops/s at batch 12 and 64.
4. ``pipeline``: ``python -m midnight_train fit`` on the shards (ViT-B/14, batch 64, the paper's
   10 loader workers): images/s and the share of the step spent waiting for data; then export.
5. ``preempt``: ``accelerate launch --use_fsdp`` (ViT-S/14): SIGTERM to the launcher -> a sharded
   checkpoint and "preempted"; ``resume=auto`` runs to the end; export reads the shards.

Each check has a time box (``TIMEOUTS``; on the GPU they sum to under 480 s, inside the device's
540 s). ``gpu_check.json`` and ``gpu_check.md`` are written before and after every check, so a
run stopped at any point still returns everything done so far (and names the check it was in).
A failed check's row shows the last line its command wrote to stderr (the exception), and the
rows a train-step check measured before a later configuration failed are kept.

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

from gpu_report import TARGETS, markdown

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.timm_kwargs={embed_dim: 64, depth: 2, num_heads: 2}", "model.img_size=56",
        "model.head_n_prototypes=256", "model.head_hidden_dim=128",
        "model.head_bottleneck_dim=64", "data.global_crop_size=56", "data.local_crop_size=28",
        "data.n_local_crops=2", "data.batch_size=4", "data.num_workers=2"]
# Each check's time box in seconds; every command of a check gets what is left of its box. On
# the GPU they sum to under 480 s, so that the run (after pip install and nvidia-smi) ends
# inside the device's hard 540 s. The CPU dry run runs on a small shared machine: generous.
TIMEOUTS = {"gpu": {"preflight": 30, "vitg": 155, "vitb": 70, "augment": 30, "pipeline": 90,
                    "preempt": 100},
            "cpu": {"preflight": 120, "vitg": 300, "vitb": 180, "augment": 150, "pipeline": 240,
                    "preempt": 360}}
CHECKS = ("vitg", "vitb", "augment", "pipeline", "preempt")  # in the order they run
# The ViT-g configurations, in the order they run: the default first (the targets' row: the
# example configs' setting, 43 GiB traced by bench/step_memory.py), the resharded student (more
# gathers, less memory) and activation checkpointing (the fallback for smaller GPUs) after.
VITG_VARIANTS = "default,augment,reshard,ckpt"


# What the checks import, tried first in ~5 s (a missing wheel is one line, not five tracebacks).
PREFLIGHT_MODULES = ("torch", "timm", "accelerate", "safetensors", "yaml", "click", "tqdm",
                     "sklearn", "PIL", "numpy", "fsspec", "braceexpand", "midnight_train.config",
                     "midnight_train.data.loader", "midnight_train.method.augment",
                     "midnight_train.loop.trainer", "midnight_train.outputs.export",
                     "midnight_train.cli")


def timeouts(args) -> dict[str, float]:
    return TIMEOUTS["cpu" if args.cpu else "gpu"]


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
    limit = timeouts(args)["preflight"]
    try:
        done = subprocess.run(cmd + (["--cpu"] if args.cpu else []), cwd=ROOT,
                              capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        sys.exit(f"gpu_check preflight: importing torch, timm and midnight_train took over "
                 f"{limit} s")
    if done.returncode != 0:
        sys.exit(last_line(done.stderr) or f"gpu_check preflight: exit {done.returncode}")
    print(done.stdout.strip(), flush=True)


# ----------------------------------------------------------------------------- commands


class CheckFailed(RuntimeError):
    """A check's command failed or ran out of its time box. ``line`` is what the table shows
    (the command's last stderr line: the exception, not just "exit 1"); ``stdout`` what the
    command printed before (the rows a train-step check measured before a later one failed)."""

    def __init__(self, message: str, line: str, stdout: str = ""):
        super().__init__(message)
        self.line, self.stdout = line, stdout
        self.partial: dict = {}


class Budget:
    """A check's time box: each command it runs may take what is left of it."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left < 1:
            raise CheckFailed(f"its {self.seconds:.0f} s were spent",
                              f"timed out: the check's {self.seconds:.0f} s were spent")
        return left


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def kill_group(proc: subprocess.Popen) -> None:
    """The command and everything it started (loader workers, accelerate's processes): they
    would otherwise keep the pipes open, and the GPU busy for the next check."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start(cmd: list[str], **kw) -> subprocess.Popen:
    """``cmd`` in its own process group (see ``kill_group``), output captured."""
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kw)


def run(cmd: list[str], budget: Budget, **kw) -> subprocess.CompletedProcess:
    print(f"$ {' '.join(cmd)}", flush=True)
    proc = start(cmd, **kw)
    try:
        stdout, stderr = proc.communicate(timeout=budget.left())
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        sys.stdout.write(stdout[-4000:])
        sys.stderr.write(stderr[-4000:])
        said = last_line(stderr) or last_line(stdout)
        raise CheckFailed(f"timed out after {budget.seconds:.0f} s: {stderr[-1500:]}",
                          f"timed out: the check's {budget.seconds:.0f} s were spent"
                          + (f"; last line: {said}" if said else ""), stdout) from None
    sys.stdout.write(stdout[-4000:])
    sys.stderr.write(stderr[-4000:])
    if proc.returncode != 0:
        raise CheckFailed(f"exit {proc.returncode}: {stderr[-1500:]}",
                          last_line(stderr) or f"exit {proc.returncode}", stdout)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def json_rows(text: str) -> list[dict]:
    """The JSON lines among a command's output (bench/train_step.py prints one per row)."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# ----------------------------------------------------------------------------- checks


def train_step_rows(args, extra: list[str], budget: Budget) -> dict:
    """``bench/train_step.py`` rows; on a failure the rows measured before it are kept."""
    base = [sys.executable, "bench/train_step.py", "--mode", "step"]
    if args.cpu:
        extra = [*extra, "--tiny", "--batch", "2", "--global-size", "56", "--local-size", "28",
                 "--n-local", "2", "--prototypes", "256", "--steps", "2", "--warmup", "1",
                 "--cpu"]
    try:
        done = run([*base, *extra], budget)
    except CheckFailed as err:
        err.partial = {"rows": json_rows(err.stdout)}
        raise
    return {"rows": json_rows(done.stdout)}


def check_vitg(args, budget: Budget) -> dict:
    extra = ["--arch", "vit_giant_patch14_dinov2", "--fsdp",
             "--variants", VITG_VARIANTS, "--data", str(args.data)]
    if not args.cpu:  # per configuration: 4 warm-up steps, then at most 10 s of timed ones
        extra += ["--batch", "12", "--prototypes", "131072", "--steps", "60", "--warmup", "4",
                  "--max-seconds", "10"]
    return train_step_rows(args, extra, budget)


def check_vitb(args, budget: Budget) -> dict:
    extra = ["--arch", "vit_base_patch14_dinov2"]
    if not args.cpu:
        extra += ["--batch", "64", "--steps", "150", "--warmup", "10", "--max-seconds", "15"]
    return train_step_rows(args, extra, budget)


def check_augment(args, budget: Budget) -> dict:
    cmd = [sys.executable, __file__, "--phase", "augment", "--data", str(args.data)]
    return last_json(run(cmd + (["--cpu"] if args.cpu else []), budget).stdout)


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
        for _ in range(3 if args.cpu else 30):
            start = time.perf_counter()
            augment(batch, generator)
            sync()
            times.append(time.perf_counter() - start)
        call_s = statistics.median(times)
        result[f"batch{batch_size}"] = {"crops": n_crops, "ms_per_batch": round(call_s * 1e3, 3),
                                        "crops_per_s": round(n_crops / call_s, 1)}
    return result


def metrics_rows(out: Path) -> list[dict]:
    """The run's metrics so far (a line still being written is not one yet)."""
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def fit_command(args, out: Path, *extra: str) -> list[str]:
    config = ROOT / "examples" / ("tiny-cpu.yaml" if args.cpu else "vitb14-ablation.yaml")
    common = [f"data.shards={args.data}", f"output_dir={out}", "train.tensorboard=false",
              "train.progress=false", "train.log_every=1", "train.grad_accum=1",
              "data.shuffle_buffer=500"]
    return [str(config), *common, *(TINY if args.cpu else []), *extra]


def check_pipeline(args, work: Path, budget: Budget) -> dict:
    """The real CLI and data pipeline feeding the GPU: ViT-B/14, batch 64, 10 workers."""
    out = work / "pipeline"
    steps = 6 if args.cpu else 100
    extra = [] if args.cpu else ["data.batch_size=64", "data.num_workers=10"]
    run([sys.executable, "-m", "midnight_train", "fit",
         *fit_command(args, out, f"train.max_steps={steps}", "train.checkpoint_every=100000",
                      *extra)], budget)
    rows = metrics_rows(out)
    steady = rows[min(10, len(rows) - 1):] if not args.cpu else rows[1:]
    step_s = statistics.median(r["step_s"] for r in steady)
    wait = sum(r["data_wait_s"] for r in steady) / sum(r["step_s"] for r in steady)
    finite = all(math.isfinite(r[k]) for r in rows for k in ("loss", "loss_dino", "loss_ibot",
                                                              "loss_kde", "grad_norm"))
    run([sys.executable, "-m", "midnight_train", "export", str(out), str(work / "export-vitb")],
        budget)
    return {"model": "tiny ViT" if args.cpu else "ViT-B/14", "steps": len(rows),
            "batch": 4 if args.cpu else 64, "workers": 2 if args.cpu else 10,
            "step_s": round(step_s, 4), "images_per_s": round(steady[-1]["samples_per_s"], 1),
            "images_per_s_median": round(statistics.median(r["samples_per_s"] for r in steady), 1),
            "data_wait_share": round(wait, 4), "finite": finite, "export": "ok"}


def preempted_run(launch: list[str], out: Path, budget: Budget) -> tuple[int, str]:
    """Start the launcher, SIGTERM it after 10 logged steps; (its exit status, what it said)."""
    print(f"$ {' '.join(launch)}  (SIGTERM after 10 steps)", flush=True)
    proc = start(launch)
    while not (out / "metrics.jsonl").exists() or len(metrics_rows(out)) < 10:
        if proc.poll() is not None or time.monotonic() > budget.end:
            kill_group(proc)
            stderr = proc.communicate()[1]
            raise CheckFailed(f"the run ended before 10 steps: {stderr[-1500:]}",
                              "the run ended before 10 steps"
                              + (f": {last_line(stderr)}" if last_line(stderr) else ""))
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # the launcher passes it on (torchrun: to the group)
    try:
        stdout, stderr = proc.communicate(timeout=budget.left())
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise CheckFailed("no exit after SIGTERM", "timed out: the launcher did not exit after "
                          "SIGTERM") from None
    return proc.returncode, stdout + stderr


def check_preempt(args, work: Path, budget: Budget) -> dict:
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
    status, said = preempted_run(launch + fit, out, budget)
    stopped_at = len(metrics_rows(out))
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    result = {"signal_exit": status, "stopped_at": stopped_at,
              "preempted_message": "preempted, resume with resume=auto" in said,
              "sharded_files": sorted(p.name for p in checkpoints[-1].glob("shard_*"))
              if checkpoints else [], "fsdp_from": "accelerate launch --use_fsdp" in said}
    if not result["preempted_message"] or not checkpoints:
        raise CheckFailed(f"no preemption checkpoint: {json.dumps(result)}\n{said[-2000:]}",
                          f"no preemption checkpoint after SIGTERM (exit {status}): "
                          f"{last_line(said)}")
    resumed = run(launch + fit + ["resume=auto"], budget)
    rows = metrics_rows(out)
    result.update(resumed_from=f"step {checkpoints[-1].name[5:].lstrip('0')}",
                  resumed_ok=f"resumed from {checkpoints[-1]}" in resumed.stdout,
                  steps=[rows[0]["step"], rows[-1]["step"]],
                  contiguous=[r["step"] for r in rows] == list(range(1, steps + 1)))
    run([sys.executable, "-m", "midnight_train", "export", str(out), str(work / "export-fsdp")],
        budget)
    result["export"] = "ok"
    return result


# ----------------------------------------------------------------------------- environment


def driver_and_name() -> tuple[str | None, str | None]:
    """(driver version, GPU name) from nvidia-smi; (None, None) where there is none."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    first = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else ""
    driver, _, name = first.partition(",")
    return (driver.strip() or None), (name.strip() or None)


def versions(gpu: bool) -> dict:
    """What the figures depend on besides the card: library, CUDA and driver versions."""
    import accelerate
    import timm
    import torch

    found = {"torch": torch.__version__, "timm": timm.__version__,
             "accelerate": accelerate.__version__, "python": platform.python_version(),
             "cuda": torch.version.cuda, "cudnn": None, "driver": None}
    if gpu:
        found["cudnn"] = torch.backends.cudnn.version()
        found["driver"] = driver_and_name()[0]
        if found["driver"] is None and hasattr(torch._C, "_cuda_getDriverVersion"):
            api = torch._C._cuda_getDriverVersion()  # e.g. 12040: the CUDA API the driver has
            found["driver"] = f"CUDA {api // 1000}.{api % 1000 // 10} driver"
    return found


def write_results(out: Path, results: dict) -> None:
    """Both files, whole, after every change: a run stopped at any point has them."""
    for name, text in (("gpu_check.json", json.dumps(results, indent=1)),
                       ("gpu_check.md", markdown(results))):
        partial = out / f".{name}.part"
        partial.write_text(text)
        partial.replace(out / name)  # never half a file, whenever the run is stopped


def run_checks(checks: dict, args, results: dict, began: float) -> None:
    """Each check in turn, in its time box; its result (or its error) and both files after it."""
    limits = timeouts(args)
    for name, check in checks.items():
        start = time.perf_counter()
        print(f"== {name} (at most {limits[name]} s)", flush=True)
        results["checks"][name] = {"running": True}
        write_results(args.out, results)
        try:
            result = check(args, Budget(limits[name]))
        except CheckFailed as err:  # recorded; the next check still runs
            result = {**err.partial, "error": str(err)[-2000:], "error_line": err.line}
        except Exception as err:
            message = f"{type(err).__name__}: {err}"
            result = {"error": message[-2000:], "error_line": last_line(message)}
        result["seconds"] = round(time.perf_counter() - start, 1)
        results["checks"][name] = result
        results["seconds"] = time.perf_counter() - began
        print(json.dumps(result), flush=True)
        write_results(args.out, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-check" / "out")
    parser.add_argument("--data", type=Path, default=ROOT / ".gpu-check" / "data")
    parser.add_argument("--cpu", action="store_true", help="dry run: tiny models on the CPU")
    parser.add_argument("--phase", choices=["augment", "preflight"], help=argparse.SUPPRESS)
    parser.add_argument("--only", "--checks", dest="only",
                        help="comma-separated checks to run, in this order (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase == "augment":
        print(json.dumps(augment_phase(args)), flush=True)
        return
    if args.phase == "preflight":
        preflight_phase(args)
        return

    began = time.perf_counter()
    wanted = args.only.split(",") if args.only else list(CHECKS)
    unknown = [name for name in wanted if name not in CHECKS]
    if unknown:
        sys.exit(f"gpu_check: unknown checks {unknown}: choose from {list(CHECKS)}")
    preflight(args)
    import torch

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # the runs of pipeline and preempt
    checks = {"vitg": check_vitg, "vitb": check_vitb, "augment": check_augment,
              "pipeline": lambda a, b: check_pipeline(a, work, b),
              "preempt": lambda a, b: check_preempt(a, work, b)}

    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu and not args.cpu:
        sys.exit("gpu_check: no CUDA device (use --cpu for a dry run)")
    device = torch.cuda.get_device_name() if gpu else f"CPU dry run ({platform.node()})"
    results = {"device": device, "versions": versions(gpu), "when": time.strftime("%Y-%m-%d"),
               "dry_run": args.cpu, "targets": TARGETS, "timeouts": timeouts(args),
               "checks": {}, "seconds": 0.0}
    run_checks({name: checks[name] for name in wanted}, args, results, began)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{markdown(results)}\nwrote {args.out / 'gpu_check.json'} and "
          f"{args.out / 'gpu_check.md'}", flush=True)
    failed = [name for name, r in results["checks"].items() if "error" in r]
    if failed:
        sys.exit(f"gpu_check: failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

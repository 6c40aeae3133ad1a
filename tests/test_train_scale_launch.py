"""Launching as Accelerate users do: which mixed precision a run takes and says it took, the
example Accelerate configs, and the SLURM script (run by bash against stand-ins for srun,
scontrol, scancel and accelerate that record what they are asked to do)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from train_fakes import make_trainer, tiny_config  # noqa: E402

from midnight_train.loop import checkpoint  # noqa: E402
from midnight_train.loop.distributed import resolve_fsdp, resolve_mixed_precision  # noqa: E402
from midnight_train.loop.errors import RunError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- precision


@pytest.fixture
def accelerate_config(tmp_path, monkeypatch):
    """Accelerate's default config file (what `accelerate config` writes), here in tmp_path."""
    import accelerate.commands.config.config_args as config_args

    path = tmp_path / "default_config.yaml"
    monkeypatch.setattr(config_args, "default_config_file", str(path))
    return path


def test_precision_sources(accelerate_config):
    def resolve(configured, cpu=False, launched=None):
        env = {} if launched is None else {"ACCELERATE_MIXED_PRECISION": launched}
        return resolve_mixed_precision(configured, cpu=cpu, environ=env)

    # auto: accelerate launch's choice when it made one, else bf16 on a GPU, fp32 on the CPU
    assert resolve("auto", launched="fp16") == (
        "fp16", "train.mixed_precision=auto: accelerate launch's choice (--mixed_precision or "
                "its config)")
    assert resolve("auto", cpu=True, launched="bf16")[0] == "bf16"
    assert resolve("auto") == ("bf16", "train.mixed_precision=auto: bf16 on a GPU")
    assert resolve("auto", cpu=True) == ("no", "train.mixed_precision=auto: fp32 on the CPU")
    # accelerate launch passes "no" when nothing was chosen: only its config file makes it one
    assert resolve("auto", launched="no")[0] == "bf16"
    accelerate_config.write_text(yaml.safe_dump({"mixed_precision": "no"}))
    assert resolve("auto", launched="no") == (
        "no", f"train.mixed_precision=auto: mixed_precision 'no' in {accelerate_config}")
    assert resolve("auto", launched="fp8")[1].endswith("(accelerate launch's fp8 is not "
                                                       "supported here)")
    # an explicit value in the config wins, and says what it overrode
    assert resolve("bf16", launched="fp16") == (
        "bf16", "train.mixed_precision=bf16 in the config; accelerate launch's fp16 ignored")
    assert resolve("no", launched="no") == ("no", "train.mixed_precision=no in the config")


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state whose precision cannot change: reset it around a
    test that trains in another precision (each real run is its own process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_auto_takes_accelerate_launch_precision_and_resume_refuses_another(
        tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    from accelerate.state import AcceleratorState

    cfg = tiny_config(tmp_path, train={"max_steps": 2, "checkpoint_every": 1})
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_pr.. bf16
    make_trainer(cfg).fit(stop_after=1)
    said = capsys.readouterr().out
    assert ("precision: bf16 (train.mixed_precision=auto: accelerate launch's choice "
            "(--mixed_precision or its config))") in said
    assert checkpoint.load(checkpoint.latest(tmp_path))["precision"] == "bf16"

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")  # plain python on the CPU: fp32
    cfg.resume = "auto"
    with pytest.raises(RunError, match=r"precision: 'bf16' -> 'no' \(train.mixed_precision=auto: "
                                       r"fp32 on the CPU\)"):
        make_trainer(cfg).fit()


def test_fsdp_from_the_config_or_accelerate_launch():
    launched = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    assert resolve_fsdp(False, launched) == (True, "accelerate launch --use_fsdp")
    # taken away: Accelerate stays data parallel and the trainer's own FSDP2 layout applies
    assert launched == {"FSDP_VERSION": "2"}
    assert resolve_fsdp(True, {}) == (True, "train.fsdp=true")
    assert resolve_fsdp(False, {"ACCELERATE_USE_FSDP": "false"}) == (False, "")


# ----------------------------------------------------------------------------- timeouts

# Rank 0 works alone (as periodic eval, writing model.pt or removing a replaced run do) while
# rank 1 waits in a collective: train.dist_timeout_s decides whether the wait is long enough.
ALONE = """
import sys, time
from train_fakes import make_trainer, tiny_config
timeout, alone = float(sys.argv[2]), float(sys.argv[3])
trainer = make_trainer(tiny_config(sys.argv[1], train={"dist_timeout_s": timeout}))
if trainer.rank == 0:
    time.sleep(alone)
trainer.accelerator.wait_for_everyone()
print("rank", trainer.rank, "waited", flush=True)
"""


@pytest.mark.parametrize("timeout,ok", [(2.0, False), (60.0, True)])
def test_process_group_timeout_covers_work_one_rank_does_alone(tmp_path, timeout, ok):
    from test_train_scale import free_port

    script = tmp_path / "alone.py"
    script.write_text(ALONE)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), str(script), str(tmp_path / "run"), str(timeout), "8"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                       "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"},
        capture_output=True, text=True, timeout=180)
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
        assert sorted(done.stdout.split("\n")[:-1]) == ["rank 0 waited", "rank 1 waited"]
    else:  # the waiting rank gave up after the configured 2 s, not torch's default 30 min
        assert done.returncode != 0 and "rank 1 waited" not in done.stdout
        assert "timed out" in done.stderr.lower() or "timeout" in done.stderr.lower(), \
            done.stderr[-3000:]


# ----------------------------------------------------------------------------- examples


def test_accelerate_examples_are_valid_and_scale_as_described():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {p.stem: load_config_from_file(str(p))
               for p in sorted((ROOT / "examples" / "accelerate").glob("*.yaml"))}
    assert set(configs) == {"1gpu", "8gpu", "4x8gpu-fsdp-vitg"}
    shape = {name: (str(c.distributed_type).split(".")[-1], c.num_machines, c.num_processes)
             for name, c in configs.items()}
    assert shape == {"1gpu": ("NO", 1, 1), "8gpu": ("MULTI_GPU", 1, 8),
                     "4x8gpu-fsdp-vitg": ("FSDP", 4, 32)}
    assert configs["4x8gpu-fsdp-vitg"].fsdp_config["fsdp_version"] == 2
    assert all(c.mixed_precision == "bf16" for c in configs.values())


# ----------------------------------------------------------------------------- SLURM

STANDINS = {
    "scontrol": """#!/bin/bash
        echo "scontrol $*" >> "$LOG"
        [ "$1 $2" = "show hostnames" ] && printf 'gpu-node-017\\ngpu-node-018\\n'
        exit 0""",
    "srun": """#!/bin/bash
        echo "srun $*" >> "$LOG"
        while [[ "$1" == --* ]]; do shift; done
        SLURM_NODEID=1 exec "$@\"""",
    "scancel": """#!/bin/bash
        echo "scancel $*" >> "$LOG"
        touch "$LOG.stop\"""",
    "accelerate": """#!/bin/bash
        echo "accelerate $*" >> "$LOG"
        # a run that ends by itself with $STATUS, or stops once the job was signalled
        for _ in $(seq 200); do
            [ -e "$LOG.stop" ] && { echo "preempted, resume with resume=auto"; exit 1; }
            [ -n "$STATUS" ] && exit "$STATUS"
            sleep 0.05
        done
        exit 99""",
}


def run_sbatch(tmp_path: Path, *, status: str = "", signal_after_start: bool = False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in STANDINS.items():
        path = bin_dir / name
        path.write_text("\n".join(line.strip() for line in text.splitlines()) + "\n")
        path.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log),
           "STATUS": status, "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[017-018]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8"}
    proc = subprocess.Popen(["bash", str(ROOT / "examples" / "slurm" / "train.sbatch"),
                             "examples/midnight-92k.yaml", "output_dir=runs/m92k"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_after_start:
        deadline = time.monotonic() + 30
        while "accelerate" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1@300
    out, err = proc.communicate(timeout=60)
    calls = log.read_text().splitlines()
    return proc.returncode, out + err, calls


def test_sbatch_launches_every_node_from_slurm_variables(tmp_path):
    status, output, calls = run_sbatch(tmp_path, status="0")
    assert status == 0, output
    launch = next(c for c in calls if c.startswith("accelerate "))
    assert launch == (
        "accelerate launch --config_file examples/accelerate/4x8gpu-fsdp-vitg.yaml "
        "--num_machines 2 --num_processes 16 --machine_rank 1 --main_process_ip gpu-node-017 "
        "--main_process_port 24242 -m midnight_train fit examples/midnight-92k.yaml "
        "output_dir=runs/m92k resume=auto")
    assert not any("requeue" in c for c in calls)
    failed, output, calls = run_sbatch(tmp_path / "failed", status="3")
    assert failed == 3, output  # a failed run is not requeued: its status is the job's


def test_sbatch_time_limit_signal_checkpoints_and_requeues(tmp_path):
    status, output, calls = run_sbatch(tmp_path, signal_after_start=True)
    assert status == 0, output
    assert "scancel --signal=USR1 4242" in calls  # passed on to every process of the step
    assert "preempted, resume with resume=auto" in output
    assert calls[-1] == "scontrol requeue 4242"

"""A training step waits for the device once, and FSDP gathers each block once per micro-step:
host syncs and collectives counted on the CPU (bench/step_counts.py) against fixed budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from step_counts import HostSyncs, count_syncs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_train_scale import free_port  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def test_the_counter_sees_what_makes_the_host_wait():
    x = torch.arange(6.0)
    masks = x > 2
    with HostSyncs() as counted:
        bool(x.sum() > 0)
        x[masks]
        torch.nonzero(masks)
        x.cpu()
        x.tolist()
        x * 2  # not a sync
    assert counted.counts == {"_local_scalar_dense": 1, "boolean-mask indexing": 1, "nonzero": 1,
                              ".cpu()": 1, ".tolist()": 1}


def test_a_step_waits_for_the_device_once():
    """Before: 40 nonzero and 2 bool() in the augmentation, 4 boolean-mask indexings in the
    forward and losses, 5 scalar reads in the step (50 in all)."""
    counts = count_syncs()
    assert counts["augment"] == {}  # branch-free on the device
    assert counts["forward_losses_backward"] == {}  # masked patches by index from the loader
    assert counts["step"] == {".cpu()": 1, ".tolist()": 1}  # the reduced losses, once
    # + the per-part gradient norms, stacked: one copy
    assert counts["logged_step"] == {".cpu()": 2, ".tolist()": 2}


def test_fsdp_gathers_each_student_block_once_per_micro_step():
    """2 gloo processes, tiny ViT (2 blocks), one FSDP step per layout."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), "bench/step_counts.py", "collectives"], cwd=ROOT, env=ENV,
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])["collectives"]
    regathered, kept, hybrid = (counts[k] for k in ("regathered", "kept_gathered",
                                                    "hybrid_kept_gathered"))
    # Regathered: the student's 5 units (2 blocks, the rest of the backbone, the head, the root)
    # gathered for 2 forwards and 2 backward passes where kept: 17 all-gathers -> 10.
    assert regathered["ops"]["allgather_base"] == 17 and kept["ops"]["allgather_base"] == 10
    assert kept["gathered_bytes"] < 0.6 * regathered["gathered_bytes"]
    assert kept["ops"]["reduce_scatter_base"] == regathered["ops"]["reduce_scatter_base"]
    # Hybrid with one process per group: whole copies, gradients all-reduced, nothing gathered.
    assert "allgather_base" not in hybrid["ops"] and "reduce_scatter_base" not in hybrid["ops"]
    assert hybrid["ops"]["allreduce"] > kept["ops"]["allreduce"]


def test_traced_step_memory_sorts_the_peak_and_counts_the_recomputation(tmp_path):
    """bench/step_memory.py on a small ViT: the trace allocates nothing, activation
    checkpointing shrinks the activations and adds the recomputed forwards to the FLOPs."""
    small = ["data.shards=unused", "model.timm_kwargs={embed_dim: 192, depth: 4, num_heads: 3}",
             "model.img_size=112", "data.global_crop_size=112", "data.local_crop_size=56",
             "data.batch_size=8"]
    done = subprocess.run([sys.executable, "bench/step_memory.py", "examples/tiny-cpu.yaml",
                           *small], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    on, off = rows["checkpointing"], rows["no_checkpointing"]
    assert on["forward_backward"]["activations"] < off["forward_backward"]["activations"]
    assert on["forward_backward"]["gflop_per_sample"] > off["forward_backward"]["gflop_per_sample"]
    assert on["forward_backward"]["parameters"] == off["forward_backward"]["parameters"] > 0
    step = on["optimizer_step"]  # AdamW's two moments per student parameter, made at step 1
    assert step["optimizer"] >= step["gradients"] > 0
    assert on["peak_mib"] == max(on["forward_backward"]["total"], step["total"])

"""Training at scale, on CPU: preemption by a real signal (a checkpoint at a step every process
agrees on, then resume=auto continues exactly), and the data split across nodes x processes x
loader workers in a 2-process run launched as two nodes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from shardkit import make_shards, read_tar  # noqa: E402

from midnight_train import checkpoint  # noqa: E402
from midnight_train.checkpoint import list_checkpoints  # noqa: E402
from midnight_train.config import load_config  # noqa: E402
from midnight_train.sources import shard_counts  # noqa: E402
from midnight_train.trainer import PREEMPTED_EXIT, TIMING_METRICS, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-cpu.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
VOLATILE = set(TIMING_METRICS)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cmu_slide):
    out = tmp_path_factory.mktemp("shards")
    make_shards(out, cmu_slide, n_shards=4, per_shard=24, tile_size=112)
    return out


def overrides(shards, out, **extra) -> list[str]:
    # max_steps far away: the runs here end by a signal or by stop_after.
    items = {"data.shards": str(shards), "output_dir": str(out), "train.max_steps": 1000,
             "train.checkpoint_every": 1000, "train.tensorboard": "false",
             "train.progress": "false", **extra}
    return [f"{k}={v}" for k, v in items.items()]


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def stable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def wait_for(condition, what: str, timeout: float = 120.0, procs=()) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"exited early ({proc.returncode}) waiting for {what}:\n"
                                     f"{out[-2000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def start_fit(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "midnight_train", "fit", str(TINY), *args],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def in_process(cfg_overrides: list[str], stop_after: int) -> None:
    """The same run in this process, with the subprocesses' single thread (same float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(TINY, cfg_overrides)).fit(stop_after=stop_after)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- preemption


def test_stop_signals(shards, tmp_path):
    """SIGTERM: the step finishes, a checkpoint is written, exit status 75, and resume=auto
    continues exactly. A second signal (in a run alongside) exits at once without one."""
    run, twice = tmp_path / "run", tmp_path / "twice"
    proc, other = start_fit(*overrides(shards, run)), start_fit(*overrides(shards, twice))
    wait_for(lambda: len(metrics(run)) >= 3, "3 training steps", procs=[proc])
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: len(metrics(twice)) >= 2, "2 training steps", procs=[other])
    other.send_signal(signal.SIGUSR1)
    other.send_signal(signal.SIGTERM)

    out, err = other.communicate(timeout=60)
    # CPython runs pending handlers in signal-number order: either may come second.
    assert other.returncode in (128 + signal.SIGTERM, 128 + signal.SIGUSR1), out + err
    assert "exiting at once, without a checkpoint" in err
    assert list_checkpoints(twice) == []

    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, out + err
    assert "SIGTERM: stopping after this optimiser step" in err
    assert "preempted, resume with resume=auto: SIGTERM at step" in err
    assert "Traceback" not in err
    reached = len(metrics(run))
    assert [r["step"] for r in metrics(run)] == list(range(1, reached + 1))  # nothing lost
    assert [p.name for p in list_checkpoints(run)] == [f"step_{reached:08d}"]
    assert f"checkpoint {run}/checkpoints/step_{reached:08d}" in err

    # resume=auto continues as if nothing had happened: the same metrics as a run never stopped.
    end = {"train.checkpoint_every": reached + 2}
    in_process(overrides(shards, run, resume="auto", **end), stop_after=reached + 2)
    reference = tmp_path / "reference"
    in_process(overrides(shards, reference, **end), stop_after=reached + 2)
    assert len(metrics(run)) == reached + 2
    assert stable(metrics(run)) == stable(metrics(reference))
    a, b = (checkpoint.load(list_checkpoints(r)[-1]) for r in (run, reference))
    assert all(torch.equal(v, b["teacher"][k]) for k, v in a["teacher"].items())


# ----------------------------------------------------------------------------- 2 processes

RECORDING_FIT = textwrap.dedent("""
    # One process of a 2-node launch: the real trainer and data pipeline; notes its pid and the
    # keys of every batch it trains on.
    import json, os, sys
    from midnight_train.config import load_config
    from midnight_train.data import make_loader
    from midnight_train.trainer import Preempted, Trainer

    out = sys.argv[1]
    rank = int(os.environ["RANK"])

    class Recording:
        def __init__(self, loader):
            self.loader = loader
        def __iter__(self):
            return self._record(iter(self.loader))  # workers start now, as the loader's own
        def _record(self, batches):
            with open(f"{out}.keys{rank}", "a") as f:
                for batch in batches:
                    f.write(json.dumps(batch["keys"]) + "\\n")
                    f.flush()
                    yield batch
        def state_dict(self):
            return self.loader.state_dict()
        def counters(self):
            return self.loader.counters()

    open(f"{out}.pid{rank}", "w").write(str(os.getpid()))
    cfg = load_config(sys.argv[2], sys.argv[3:])
    try:
        Trainer(cfg, make_loader=lambda *a, **k: Recording(make_loader(*a, **k))).fit()
    except Preempted:
        sys.exit(75)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_split_the_data_and_stop_together_on_one_signal(shards, tmp_path):
    """Launched as 2 nodes x 1 process x 2 loader workers: 4 streams, each reading its own
    shard; a SIGUSR1 to process 1 alone stops both after the same step, with one checkpoint."""
    script = tmp_path / "recording_fit.py"
    script.write_text(RECORDING_FIT)
    run = tmp_path / "run"
    port = free_port()
    args = [str(run), str(TINY), *overrides(shards, run, **{"data.num_workers": 2,
                                                            "data.batch_size": 4})]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
         "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
         str(script), *args], cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]

    def keys(rank: int) -> list[list[str]]:
        path = Path(f"{run}.keys{rank}")
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    wait_for(lambda: min(len(keys(0)), len(keys(1))) >= 2, "2 steps on both processes",
             procs=nodes)
    os.kill(int(Path(f"{run}.pid1").read_text()), signal.SIGUSR1)
    outputs = [node.communicate(timeout=120) for node in nodes]
    assert all(node.returncode != 0 for node in nodes), outputs
    err0 = outputs[0][1]
    assert "preempted, resume with resume=auto: a stop signal to another process" in err0, err0

    reached = len(metrics(run))
    assert reached >= 2 and [r["step"] for r in metrics(run)] == list(range(1, reached + 1))
    (saved,) = list_checkpoints(run)  # one checkpoint, of the step both processes stopped at
    assert saved.name == f"step_{reached:08d}"
    states = [checkpoint.load_rank(saved, rank) for rank in (0, 1)]
    assert [s["step"] for s in states] == [reached, reached]
    assert [len(keys(rank)) for rank in (0, 1)] == [reached, reached]  # batches trained on

    # Stream s = rank * workers + worker owns shards[s::4]: node 0 reads shards 0 and 1, node 1
    # shards 2 and 3, each worker one, so no tile is seen twice in an epoch.
    urls = [url for url, _ in shard_counts(str(shards))]
    shard_of = {key: i for i, url in enumerate(urls) for key, _ in read_tar(url)}
    for rank, owned in ((0, {0, 1}), (1, {2, 3})):
        seen = [key for batch in keys(rank) for key in batch]
        assert len(seen) == len(set(seen))
        assert {shard_of[key] for key in seen} == owned, rank

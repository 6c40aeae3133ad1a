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

from midnight_train.config import load_config  # noqa: E402
from midnight_train.data.sources import shard_counts  # noqa: E402
from midnight_train.loop import checkpoint  # noqa: E402
from midnight_train.loop.checkpoint import list_checkpoints  # noqa: E402
from midnight_train.loop.signals import PREEMPTED_EXIT  # noqa: E402
from midnight_train.loop.step import TIMING_METRICS  # noqa: E402
from midnight_train.loop.trainer import Trainer  # noqa: E402

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
    from midnight_train.data.loader import make_loader
    from midnight_train.loop.signals import Preempted
    from midnight_train.loop.trainer import Trainer

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
    # shards 2 and 3, one per loader worker, so no tile is read by two processes.
    urls = [url for url, _ in shard_counts(str(shards))]
    shard_of = {key: i for i, url in enumerate(urls) for key, _ in read_tar(url)}
    for rank, owned in ((0, {0, 1}), (1, {2, 3})):
        assert {shard_of[key] for batch in keys(rank) for key in batch} == owned, rank


# ----------------------------------------------------------------------------- FSDP

FSDP_RUNS = textwrap.dedent("""
    # Both processes of a 2-process launch train several tiny runs one after another.
    import sys
    from train_fakes import make_trainer, tiny_config
    from midnight_train.outputs.periodic_eval import EvalConfig

    out, labelled = sys.argv[1], sys.argv[2]

    def run(name, fsdp, *, stop_after=None, resume=None, evaluate=False, **train):
        cfg = tiny_config(f"{out}/{name}", train={"max_steps": 4, "checkpoint_every": 2,
                                                  "fsdp": fsdp, **train},
                          model={"grad_checkpointing": True})  # activations recomputed
        cfg.resume = resume
        if evaluate:
            cfg.eval = EvalConfig(every=2, sets=[{"name": "mag", "train": f"{labelled}/train",
                                                  "test": f"{labelled}/test"}],
                                  methods=["knn"], k=3)
        trainer = make_trainer(cfg)
        trainer.fit(stop_after=stop_after)
        return trainer

    run("fsdp", True, evaluate=True)  # sharded, evaluating every 2 steps
    run("cut", True, stop_after=2)  # sharded, stopped after step 2 ...
    run("cut", True, resume="auto")  # ... and continued
    run("ddp", False)  # the same run, replicated
    run("hybrid", True, fsdp_shard_size=1)  # hybrid: 2 groups of 1 process, whole copies
    run("regathered", True, fsdp_keep_gathered=False)  # blocks gathered for every pass
    last = run("from_ddp", True, resume=f"{out}/ddp/checkpoints/step_00000002")  # whole -> slices
    last.close()
""")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, cmu_slide):
    """Real tissue at two magnifications, as class folders (train and test)."""
    from PIL import Image
    from shardkit import tissue_tiles

    root = tmp_path_factory.mktemp("labelled")
    for i, tile in enumerate(tissue_tiles(cmu_slide, 8, size=112, seed=5)):
        split = "train" if i < 5 else "test"
        for label, img in (("fine", Image.fromarray(tile[28:84, 28:84])),
                           ("coarse", Image.fromarray(tile).resize((56, 56)))):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            img.save(root / split / label / f"{i}.png")
    return root


@pytest.fixture
def process_group_cleanup():
    """A single-process FSDP run makes a process group of one: gone again after the test."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def test_fsdp_on_two_processes_matches_ddp_resumes_exactly_and_exports(tmp_path, labelled,
                                                                       process_group_cleanup):
    """FSDP2 with gloo on the CPU: student and teacher sharded per block over 2 processes."""
    script = tmp_path / "fsdp_runs.py"
    script.write_text(FSDP_RUNS)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), str(script), str(tmp_path), str(labelled)],
        # timm's reentrant checkpoints by default (its switch): DDP must still work, as
        # the backbone runs twice per step with activations recomputed
        cwd=ROOT, env={**ENV, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "TIMM_REENTRANT_CKPT": "1"},
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "FSDP (train.fsdp=true): student and teacher sharded over 2 process(es)" in done.stdout
    assert ("student and teacher hybrid: sharded within groups of 1 process(es), replicated over "
            "2 groups") in done.stdout

    def rows(name, *, evals=False):
        return [{k: v for k, v in r.items() if k not in VOLATILE and k.startswith("eval/") == evals
                 or k == "step"} for r in metrics(tmp_path / name)]

    # Sharded checkpoints: each process's slices, model.pt without the model's tensors.
    last = list_checkpoints(tmp_path / "fsdp")[-1]
    assert sorted(p.name for p in last.iterdir()) == [
        "model.pt", "rank_00000.pt", "rank_00001.pt", "shard_00000.pt", "shard_00001.pt"]
    head = checkpoint.load(last, join=False)
    assert head["sharded"] == 2 and not any(v.dim() for v in head["teacher"].values())
    slices = [checkpoint.load_shard(last, r)["teacher"]["backbone.vit.pos_embed"] for r in (0, 1)]
    assert [tuple(s.shape) for s in slices] == [(1, 5, 32), (0, 5, 32)]  # split on dim 0

    # The same training as replicated data parallel; resumed exactly; evaluation all along.
    assert rows("fsdp") == rows("cut")
    for other in ("ddp", "hybrid", "regathered"):
        for a, b in zip(rows("fsdp"), rows(other), strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), other
    # Hybrid: the first group's process writes the slices (here: whole tensors), once.
    hybrid = list_checkpoints(tmp_path / "hybrid")[-1]
    assert sorted(p.name for p in hybrid.iterdir()) == [
        "model.pt", "rank_00000.pt", "rank_00001.pt", "shard_00000.pt"]
    assert checkpoint.load(hybrid, join=False)["sharded"] == 1
    assert [r["step"] for r in rows("fsdp", evals=True) if "eval/mag/knn" in r] == [2, 4]
    scores = [r["eval/mag/knn"] for r in metrics(tmp_path / "fsdp") if "eval/mag/knn" in r]
    assert all(0 <= score <= 1 for score in scores)
    whole = {name: checkpoint.load(list_checkpoints(tmp_path / name)[-1])
             for name in ("fsdp", "cut", "ddp", "from_ddp")}
    for name, value in whole["fsdp"]["teacher"].items():
        assert torch.equal(value, whole["cut"]["teacher"][name]), name
        for other in ("ddp", "from_ddp"):
            assert torch.allclose(value, whole[other]["teacher"][name], atol=1e-6), (other, name)
    for index, slots in whole["ddp"]["optimizer"]["state"].items():
        assert slots["exp_avg"].shape == whole["fsdp"]["optimizer"]["state"][index]["exp_avg"].shape

    # export reads the sharded checkpoint; a 1-process run continues it (whole tensors).
    from midnight_train.outputs.export import export_backbone

    folder = export_backbone(tmp_path / "fsdp", tmp_path / "export")
    from safetensors.torch import load_file

    exported = load_file(Path(folder) / "model.safetensors")
    assert torch.equal(exported["pos_embed"], whole["fsdp"]["teacher"]["backbone.vit.pos_embed"])
    from train_fakes import make_trainer, tiny_config

    cfg = tiny_config(tmp_path / "one", train={"max_steps": 4, "checkpoint_every": 2},
                      model={"grad_checkpointing": True})
    cfg.resume = str(list_checkpoints(tmp_path / "fsdp")[0])
    make_trainer(cfg).fit()
    assert [r["step"] for r in metrics(tmp_path / "one")] == [3, 4]
    # ... and so does a 1-process FSDP run, reading only its rows of the 2 saved slices.
    cfg = tiny_config(tmp_path / "one_fsdp", train={"max_steps": 4, "checkpoint_every": 2,
                                                    "fsdp": True},
                      model={"grad_checkpointing": True})
    cfg.resume = str(list_checkpoints(tmp_path / "fsdp")[0])
    trainer = make_trainer(cfg)
    trainer.fit()
    for a, b in zip(metrics(tmp_path / "one_fsdp"), metrics(tmp_path / "one"), strict=True):
        a, b = ({k: v for k, v in r.items() if k not in VOLATILE} for r in (a, b))
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_a_damaged_shard_file_is_skipped_like_a_damaged_rank_file(
        tmp_path, capsys, process_group_cleanup):
    from train_fakes import make_trainer, tiny_config

    def config(**extra):
        cfg = tiny_config(tmp_path / "run", train={"max_steps": 3, "checkpoint_every": 1,
                                                   "keep_checkpoints": 3, "fsdp": True})
        for key, value in extra.items():
            setattr(cfg, key, value)
        return cfg

    make_trainer(config()).fit(stop_after=2)
    damaged = list_checkpoints(tmp_path / "run")[-1]
    checkpoint.shard_file(damaged, 0).write_bytes(b"\x80\x02garbage")
    with pytest.raises(checkpoint.CheckpointError, match="shard_00000.pt: unreadable"):
        checkpoint.load(damaged)
    capsys.readouterr()
    make_trainer(config(resume="auto")).fit()
    said = capsys.readouterr()
    assert f"skipped damaged checkpoint: {damaged}/shard_00000.pt: unreadable" in said.err
    assert "(step 1)" in said.out
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3]


def test_resliced_rows_are_the_slices_of_the_whole(tmp_path):
    """A checkpoint saved as 3 slices, read as 2 (and 5): each process's rows, as FSDP2 cuts
    the whole tensor, read from memory-mapped shard files."""
    from midnight_train.loop.distributed import rank_slice

    whole = {"a": torch.arange(7 * 3.0).view(7, 3), "b": torch.arange(2.0).view(2, 1, 1)}
    for i in range(3):
        part = {name: rank_slice(t, i, 3) for name, t in whole.items()}
        torch.save({"student": part, "teacher": part, "optimizer": {0: {"exp_avg": part["a"]}}},
                   checkpoint.shard_file(tmp_path, i))
    for world in (2, 5):
        for rank in range(world):
            got = checkpoint.load_resliced(tmp_path, 3, rank, world)
            for name, t in whole.items():
                assert torch.equal(got["teacher"][name], rank_slice(t, rank, world)), (world, name)
            assert torch.equal(got["optimizer"][0]["exp_avg"], rank_slice(whole["a"], rank, world))

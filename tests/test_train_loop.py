"""Trainer mechanics on a tiny ViT with an in-memory data stand-in (fast, CPU)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_fakes import FakeLoader, fake_augment, make_trainer, tiny_config, tiny_model  # noqa: E402

from midnight_train.loop import checkpoint  # noqa: E402
from midnight_train.loop.checkpoint import latest, list_checkpoints  # noqa: E402
from midnight_train.loop.errors import NonFiniteLossError  # noqa: E402
from midnight_train.loop.step import TIMING_METRICS  # noqa: E402
from midnight_train.loop.watch import LoaderWatch  # noqa: E402

VOLATILE = set(TIMING_METRICS)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def test_metrics_fields_and_finite(tmp_path):
    make_trainer(tiny_config(tmp_path, train={"max_steps": 3})).fit()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    required = ["step", "loss", "loss_dino", "loss_ibot", "loss_kde", "lr", "wd",
                "teacher_momentum", "teacher_temp", "grad_norm", "student_cls_cos",
                "teacher_cls_cos", "teacher_cls_std", "samples_per_s", "teacher_entropy",
                "step_s", "data_wait_s"]
    for r in rows:
        for k in required:
            assert k in r and isinstance(r[k], float | int) and r[k] == r[k], k
    assert (tmp_path / "config.yaml").exists()


def test_resume_gives_identical_metrics(tmp_path):
    train = {"max_steps": 6, "checkpoint_every": 3, "grad_accum": 2}
    make_trainer(tiny_config(tmp_path / "full", train=train)).fit()
    interrupted = tiny_config(tmp_path / "cut", train=train)
    make_trainer(interrupted).fit(stop_after=3)
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3]
    interrupted.resume = "auto"
    make_trainer(interrupted).fit()
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 7))
    assert stable(full) == stable(cut)
    a = checkpoint.load(latest(tmp_path / "full"))
    b = checkpoint.load(latest(tmp_path / "cut"))
    for key in ("student", "teacher"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={"max_steps": 4, "checkpoint_every": 2})
    real_write = checkpoint._write

    def crashing_write(obj, path):
        if obj.get("step") == 4 and Path(path).name == "model.pt":
            Path(path).write_bytes(b"half a checkpoint")  # as if killed mid-write
            raise KeyboardInterrupt("killed during save")
        real_write(obj, path)

    monkeypatch.setattr(checkpoint, "_write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(cfg).fit()
    monkeypatch.setattr(checkpoint, "_write", real_write)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002"]
    assert (tmp_path / "checkpoints" / ".tmp_step_00000004").exists()  # ignored leftovers
    cfg.resume = "auto"
    trainer = make_trainer(cfg)
    trainer.fit()
    assert trainer.step == 4
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_keeps_last_k_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, train={"max_steps": 5, "checkpoint_every": 1,
                                       "keep_checkpoints": 2})
    make_trainer(cfg).fit()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]


def test_teacher_is_exact_ema_of_student(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, train={"max_steps": 3}))
    teacher0 = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    student = trainer.accelerator.unwrap_model(trainer.student)
    assert all(torch.equal(teacher0[k], v) for k, v in student.state_dict().items())
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    opt_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in trainer.teacher.parameters()}
    trainer.fit(stop_after=1)
    m = trainer.schedules.at(0).teacher_momentum
    assert m < 1
    for name, s in student.named_parameters():
        expected = torch.lerp(teacher0[name], s.detach(), 1 - m)  # m*t + (1-m)*s
        assert torch.equal(dict(trainer.teacher.named_parameters())[name], expected), name
    assert not torch.equal(trainer.teacher.backbone.vit.blocks[0].attn.qkv.weight,
                           student.backbone.vit.blocks[0].attn.qkv.weight)


def test_schedules_count_optimiser_steps_with_accumulation(tmp_path):
    cfg = tiny_config(tmp_path, train={"max_steps": 4, "grad_accum": 3, "warmup_steps": 1,
                                       "checkpoint_every": 4},
                      loss={"teacher_temp_warmup_steps": 2})
    trainer = make_trainer(cfg)
    trainer.fit()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        v = trainer.schedules.at(r["step"] - 1)
        assert r["lr"] == pytest.approx(v.lr) and r["teacher_temp"] == pytest.approx(v.teacher_temp)
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] == pytest.approx(1e-3)  # warmup 1 step
    assert rows[-1]["teacher_temp"] == pytest.approx(0.07)
    assert trainer.global_batch == 4 * 3
    # 4 optimiser updates from 12 micro-batches, and the data position says 12.
    states = [s for s in trainer.optimizer.state_dict()["state"].values()]
    assert all(int(s["step"]) == 4 for s in states)
    rank = checkpoint.load_rank(latest(tmp_path), 0)
    assert rank["data"] == {"position": 12} and rank["step"] == 4


def test_dino_only_with_zero_lr_leaves_teacher_unchanged(tmp_path):
    cfg = tiny_config(tmp_path, train={"max_steps": 3, "base_lr": 0.0, "min_lr": 0.0},
                      loss={"ibot_weight": 0.0, "kde_weight": 0.0, "koleo_weight": 0.0})
    trainer = make_trainer(cfg)
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.fit()
    rows = read_metrics(tmp_path)
    assert all(r["grad_norm"] > 0 for r in rows)  # gradients flowed, the lr kept them out
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(before[k], v), k


def test_kde_term_alone_spreads_student_embeddings(tmp_path):
    cfg = tiny_config(tmp_path, train={"max_steps": 12, "base_lr": 2e-2, "min_lr": 2e-2,
                                       "weight_decay": 0.0, "weight_decay_end": 0.0,
                                       "layerwise_decay": 1.0, "patch_embed_lr_mult": 1.0},
                      loss={"dino_weight": 0.0, "ibot_weight": 0.0, "kde_weight": 1.0},
                      model={"layer_scale_init": 1.0, "drop_path_rate": 0.0})
    make_trainer(cfg).fit()
    rows = read_metrics(tmp_path)
    assert rows[-1]["loss_kde"] < rows[0]["loss_kde"]
    assert rows[-1]["student_cls_cos"] < rows[0]["student_cls_cos"] - 0.05


def test_non_finite_loss_stops_with_step_and_term(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={"max_steps": 4, "checkpoint_every": 2})
    make_trainer(cfg).fit(stop_after=2)
    good = latest(tmp_path)
    mtime = (good / "model.pt").stat().st_mtime_ns
    import midnight_train.method.objective as objective_mod

    monkeypatch.setattr(objective_mod, "kde_loss", lambda z, *a, **k: z.sum() * float("nan"))
    cfg.resume = "auto"
    with pytest.raises(NonFiniteLossError, match=r"step 3: loss=nan, .*loss_kde=nan"):
        make_trainer(cfg).fit()
    assert list_checkpoints(tmp_path) == [good]
    assert (good / "model.pt").stat().st_mtime_ns == mtime


def test_optimiser_and_ema_are_multi_tensor(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, train={"max_steps": 1}))
    defaults = getattr(trainer.optimizer, "optimizer", trainer.optimizer).defaults
    assert defaults.get("fused") or defaults.get("foreach")  # no per-parameter Python loop
    pairs = trainer.train_step.ema_pairs
    student = trainer.accelerator.unwrap_model(trainer.student)
    assert [id(p) for p in pairs.student] == [id(p) for p in student.parameters()]
    assert [id(p) for p in pairs.teacher] == [id(p) for p in trainer.teacher.parameters()]
    assert not pairs.cast
    from dataclasses import replace

    from midnight_train.method.models import SSLNetwork
    from midnight_train.method.student_teacher import EMAPairs

    other = SSLNetwork(replace(trainer.cfg.model, head_n_prototypes=7))
    with pytest.raises(RuntimeError, match="mismatch"):
        EMAPairs(trainer.teacher, other)


def test_non_finite_loss_never_reaches_the_weights(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, train={"max_steps": 2, "grad_accum": 2})
    trainer = make_trainer(cfg)
    student = trainer.accelerator.unwrap_model(trainer.student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    import midnight_train.method.objective as objective_mod

    monkeypatch.setattr(objective_mod, "kde_loss", lambda z, *a, **k: z.sum() * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"step 1: loss=nan"):
        trainer.fit()
    for k, v in student.state_dict().items():
        assert torch.equal(before[k], v), k
    for k, v in trainer.teacher.state_dict().items():
        assert torch.equal(teacher[k], v), k


class SlowLoader(FakeLoader):
    """A loader that cannot keep up: 0.3 s per batch (a tiny step takes ~30 ms)."""

    def __next__(self):
        time.sleep(0.3)
        return super().__next__()


def test_loader_watch_warns_over_doubling_windows():
    warned = []
    watch = LoaderWatch(0.1, 2)
    for step in range(1, 12):  # 20 % of every step waiting, the first step left out
        watch.add(step, 0.2, 1.0, lambda share, first, last: warned.append((share, first, last)))
    assert warned == [(pytest.approx(0.2), 2, 3), (pytest.approx(0.2), 4, 7)]
    quiet = LoaderWatch(0.1, 2)
    for step in range(1, 12):
        quiet.add(step, 0.05, 1.0, lambda *a: pytest.fail("5 % is not starving"))


def test_timing_metrics_and_a_starving_loader_is_reported(tmp_path, monkeypatch, capsys):
    import midnight_train.loop.watch as watch_module
    from midnight_train.loop.trainer import Trainer

    monkeypatch.setattr(watch_module, "STARVED_WINDOW", 2)
    cfg = tiny_config(tmp_path / "slow", train={"max_steps": 3, "checkpoint_every": 3})
    Trainer(cfg, make_loader=SlowLoader, augment=fake_augment).fit()
    warned = capsys.readouterr().err
    assert "the data loader is starving training: " in warned
    assert "of the time of steps 2-3 went to waiting for batches" in warned
    for r in read_metrics(tmp_path / "slow"):
        assert 0.3 <= r["data_wait_s"] < r["step_s"]
        assert r["samples_per_s"] == pytest.approx(4 / r["step_s"])

    make_trainer(tiny_config(tmp_path / "fast", train={"max_steps": 5})).fit()
    assert "starving" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- kernels


def test_compiled_blocks_train_like_eager_and_save_the_same_keys(tmp_path, capsys):
    """train.compile: each ViT block through torch.compile (inductor, a C++ compiler on the
    CPU); the same losses as eager and checkpoints that load into an uncompiled model."""
    import torch._dynamo

    no_drop = {"drop_path_rate": 0.0}  # inductor draws its own random numbers
    rows = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        make_trainer(tiny_config(out, train={"max_steps": 3, "compile": compiled},
                                 model=no_drop)).fit()
        rows[compiled] = stable(read_metrics(out))
        if compiled:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # global, local
    assert "torch.compile: each ViT block (train.compile=true)" in capsys.readouterr().out
    for eager, compiled in zip(rows[False], rows[True], strict=True):
        assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    keys = {c: sorted(checkpoint.load(latest(tmp_path / str(c)))["student"]) for c in rows}
    assert keys[True] == keys[False]


@pytest.fixture
def restore_kernel_settings():
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    torch.backends.cuda.enable_flash_sdp(saved[4])
    torch.backends.cuda.enable_mem_efficient_sdp(saved[5])


def test_deterministic_switch_sets_every_kernel_choice_and_trains_the_same(
        tmp_path, capsys, restore_kernel_settings, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    make_trainer(tiny_config(tmp_path / "plain", train={"max_steps": 2})).fit()
    make_trainer(tiny_config(tmp_path / "det", train={"max_steps": 2, "deterministic": True})).fit()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.flash_sdp_enabled()
    assert not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.math_sdp_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "deterministic kernels (train.deterministic=true)" in capsys.readouterr().out
    # on the CPU the default kernels are already repeatable: the same numbers either way
    assert stable(read_metrics(tmp_path / "det")) == stable(read_metrics(tmp_path / "plain"))


def test_gradients_are_clipped_per_part_as_dinov2(tmp_path):
    """DINOv2 clips backbone, DINO head and iBOT head separately: large head gradients must not
    shrink the backbone's update (one global norm scales it by 3 / 30 here)."""
    from midnight_train.loop.step import clip_per_part, student_parts
    from midnight_train.method.models import SSLNetwork

    net = SSLNetwork(tiny_model(ibot_separate_head=True, ibot_n_prototypes=16))
    parts = student_parts(net)
    assert list(parts) == ["backbone", "dino_head", "ibot_head"]
    assert sum(len(p) for p in parts.values()) == len(list(net.parameters()))
    wanted = {"backbone": 2.0, "dino_head": 30.0, "ibot_head": 1.0}
    for name, params in parts.items():
        for p in params:
            p.grad = torch.ones_like(p)
        scale = wanted[name] / torch.cat([p.grad.flatten() for p in params]).norm()
        for p in params:
            p.grad.mul_(scale)
    before = {n: [p.grad.clone() for p in ps] for n, ps in parts.items()}
    norms = clip_per_part(parts, 3.0)
    assert {n: round(v.item(), 4) for n, v in norms.items()} == wanted
    for name, params in parts.items():
        factor = min(1.0, 3.0 / wanted[name])
        for p, g in zip(params, before[name], strict=True):
            assert torch.allclose(p.grad, g * factor, rtol=1e-4), name
    # a run logs each part's norm and their total
    make_trainer(tiny_config(tmp_path, train={"max_steps": 2},
                             model={"ibot_separate_head": True, "ibot_n_prototypes": 16})).fit()
    for row in read_metrics(tmp_path):
        parts_sq = sum(row[f"grad_norm_{n}"] ** 2 for n in ("backbone", "dino_head", "ibot_head"))
        assert row["grad_norm"] == pytest.approx(parts_sq ** 0.5, rel=1e-5)

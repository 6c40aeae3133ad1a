"""The student/teacher pair: the teacher built as a copy of the student, its EMA update (on each
process's shards when sharded), and the optimiser's parameter groups with their schedule
multipliers."""

from __future__ import annotations

import copy

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.4: no FSDP2 either
    DTensor = ()  # type: ignore[assignment,misc]

from midnight_train.method.models import ModelConfig, SSLNetwork


def build_student_teacher(cfg: ModelConfig) -> tuple[SSLNetwork, SSLNetwork]:
    """The teacher starts as an exact copy of the student, never gets gradients and always runs
    in eval mode (no drop path)."""
    student = SSLNetwork(cfg)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 parameter (a view: writing to it writes the parameter),
    or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class EMAPairs:
    """The teacher and student parameters in matching order (names and shapes checked once), for
    ``ema_update``. Build it once per run: the lists stay valid while the modules keep their
    parameter objects (``load_state_dict``, ``.to(device)`` and checkpoint loading copy in
    place). Sharded (FSDP2), ``local()`` takes each process's shards at the time of the update:
    a local view taken before FSDP's lazy initialisation may no longer be the parameter's."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        self.teacher: list[torch.Tensor] = []
        self.student: list[torch.Tensor] = []
        for (tn, tp), (sn, sp) in zip(teacher.named_parameters(), student.named_parameters(),
                                      strict=True):
            if tn != sn or tp.shape != sp.shape:
                raise RuntimeError(f"teacher/student parameter mismatch: {tn} "
                                   f"{tuple(tp.shape)} vs {sn} {tuple(sp.shape)}")
            self.teacher.append(tp)
            self.student.append(sp)
        self.cast = any(t.dtype != s.dtype for t, s in zip(self.teacher, self.student, strict=True))
        self.sharded = any(isinstance(t, DTensor) for t in self.teacher)

    def local(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher, student) tensors to update: this process's shards, or the parameters."""
        if not self.sharded:
            return self.teacher, self.student
        return ([local_tensor(t) for t in self.teacher], [local_tensor(s) for s in self.student])


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float,
               pairs: EMAPairs | None = None) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, as ``teacher + (1 - momentum) *
    (student - teacher)`` (lerp): exact when the two are equal, so a student that does not move
    leaves the teacher bit-for-bit unchanged. One multi-tensor ``_foreach_lerp_`` over all
    parameters, no per-parameter Python loop when ``pairs`` (an ``EMAPairs``) is passed."""
    pairs = pairs if pairs is not None else EMAPairs(teacher, student)
    t_params, s_params = pairs.local()
    if pairs.cast:
        s_params = [s.to(t.dtype) for s, t in zip(s_params, t_params, strict=True)]
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def param_groups(student: SSLNetwork, layerwise_decay: float,
                 patch_embed_lr_mult: float) -> list[dict]:
    """AdamW groups with ``lr_mult``/``wd_mult``/``last_layer`` for the schedules to apply.

    Layer-wise lr decay: block i gets decay^(depth - i); embeddings (patch, tokens, position) get
    decay^(depth + 1), the patch embedding additionally x patch_embed_lr_mult; final norm and heads
    get 1. No weight decay on biases, norms and layer-scale gammas."""
    depth = len(student.backbone.vit.blocks)
    groups: dict[tuple, dict] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        short = name.removeprefix("backbone.").removeprefix("vit.")
        if short.startswith("blocks."):
            layer = int(short.split(".")[1]) + 1
        elif short.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "mask_token")):
            layer = 0
        else:
            layer = depth + 1
        lr_mult = layerwise_decay ** (depth + 1 - layer)
        if short.startswith("patch_embed"):
            lr_mult *= patch_embed_lr_mult
        no_wd = name.endswith(".bias") or "norm" in name or ".gamma" in name
        wd_mult = 0.0 if no_wd else 1.0
        last = ".last_layer." in f".{name}"
        key = (lr_mult, wd_mult, last)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_mult": lr_mult,
                                        "wd_mult": wd_mult, "last_layer": last})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float,
                   last_layer_frozen: bool) -> None:
    for g in optimizer.param_groups:
        frozen = last_layer_frozen and g.get("last_layer", False)
        g["lr"] = 0.0 if frozen else lr * g.get("lr_mult", 1.0)
        g["weight_decay"] = wd * g.get("wd_mult", 1.0)

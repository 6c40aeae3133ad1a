"""The DINOv2 student/teacher objective: EMA teacher, the loss terms combined with their weights,
collapse monitors, and the optimiser's parameter groups."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.4: no FSDP2 either
    DTensor = ()  # type: ignore[assignment,misc]

from midnight_train.config import LossConfig
from midnight_train.method.losses import (
    TeacherTargets,
    dino_loss,
    ibot_loss,
    ibot_mask_weights,
    kde_loss,
    koleo_loss,
    mean_pairwise_cosine,
)
from midnight_train.method.models import ModelConfig, SSLNetwork


def build_student_teacher(cfg: ModelConfig) -> tuple[SSLNetwork, SSLNetwork]:
    """The teacher starts as an exact copy of the student, never gets gradients and always runs
    in eval mode (no drop path)."""
    student = SSLNetwork(cfg)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.eval()
    return student, teacher


def shard_student_teacher(student: SSLNetwork, teacher: SSLNetwork, mesh,
                          param_dtype: torch.dtype | None) -> None:
    """Shard both networks with FSDP2 (``fully_shard``) over ``mesh``, in place: one unit per ViT
    block, one for the rest of the backbone (patch embedding, tokens, final norm), one per head,
    then the network. Every parameter is split along its first dimension the same way in both,
    so each process's teacher shard pairs with its student shard for the EMA, with no
    communication. ``param_dtype`` (bf16) is the compute precision of the gathered parameters;
    the shards (master weights, optimiser state) stay fp32 and gradients are reduced in fp32.
    The teacher reshards after every forward (it has no backward to do it)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for net, root_reshard in ((student, None), (teacher, True)):
        units = [*net.backbone.vit.blocks, net.backbone, net.dino_head]
        if net.ibot_head is not None:
            units.append(net.ibot_head)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=root_reshard)
    # The network's outputs are views (slices of the token tensor); nothing writes into them in
    # place, which is what FSDP2 warns about on every run.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP2 parameter (a view: writing to it writes the parameter),
    or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class EMAPairs:
    """The teacher and student parameters in matching order (names and shapes checked once), for
    ``ema_update``; this process's shards when the networks are sharded. Build it once per run:
    the lists stay valid while the modules keep their parameter objects (``load_state_dict``,
    ``.to(device)`` and checkpoint loading copy in place)."""

    def __init__(self, teacher: nn.Module, student: nn.Module):
        self.teacher: list[torch.Tensor] = []
        self.student: list[torch.Tensor] = []
        for (tn, tp), (sn, sp) in zip(teacher.named_parameters(), student.named_parameters(),
                                      strict=True):
            if tn != sn or tp.shape != sp.shape:
                raise RuntimeError(f"teacher/student parameter mismatch: {tn} "
                                   f"{tuple(tp.shape)} vs {sn} {tuple(sp.shape)}")
            self.teacher.append(local_tensor(tp))
            self.student.append(local_tensor(sp))
        self.cast = any(t.dtype != s.dtype for t, s in zip(self.teacher, self.student, strict=True))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float,
               pairs: EMAPairs | None = None) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, as ``teacher + (1 - momentum) *
    (student - teacher)`` (lerp): exact when the two are equal, so a student that does not move
    leaves the teacher bit-for-bit unchanged. One multi-tensor ``_foreach_lerp_`` over all
    parameters, no per-parameter Python loop when ``pairs`` (an ``EMAPairs``) is passed."""
    pairs = pairs if pairs is not None else EMAPairs(teacher, student)
    s_params = pairs.student
    if pairs.cast:
        s_params = [s.to(t.dtype) for s, t in zip(s_params, pairs.teacher, strict=True)]
    torch._foreach_lerp_(pairs.teacher, s_params, 1.0 - momentum)


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


class SSLObjective(nn.Module):
    """Computes every loss term and monitor for one augmented batch. Holds the teacher-target
    state (centering buffers), which is saved with the checkpoints."""

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig):
        super().__init__()
        self.cfg = loss_cfg
        kw = dict(mode=loss_cfg.teacher_targets, center_momentum=loss_cfg.center_momentum,
                  sk_iterations=loss_cfg.sk_iterations)
        self.dino_targets = TeacherTargets(model_cfg.head_n_prototypes, **kw)
        ibot_k = (model_cfg.ibot_n_prototypes if model_cfg.ibot_separate_head
                  else model_cfg.head_n_prototypes)
        self.ibot_targets = TeacherTargets(ibot_k, **kw)

    @torch.no_grad()
    def teacher_forward(self, teacher: SSLNetwork, global_crops: torch.Tensor,
                        masks: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = teacher.backbone(global_crops)
        p = teacher.backbone.num_prefix_tokens
        cls = tokens[:, 0]
        dino, ibot = teacher.heads(cls, tokens[:, p:][masks])
        return {"cls": cls, "dino_logits": dino, "ibot_logits": ibot}

    def forward(self, student: nn.Module, teacher: SSLNetwork, batch: dict,
                teacher_temp: float,
                autocast: Callable[[], AbstractContextManager] = nullcontext,
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Returns ``(losses, monitors)``; ``losses["loss"]`` is the weighted total to minimise."""
        cfg = self.cfg
        gc, lc, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
        n_images = gc.shape[0]
        batch_size = n_images // 2
        n_local = lc.shape[0] // batch_size if lc is not None and lc.numel() else 0
        # Both forwards under autocast: Accelerate's data-parallel wrapper would add it to the
        # student's, a sharded student has none (FSDP's bf16 parameters alone would run norms
        # and softmax in bf16). The losses take fp32 copies of what they read.
        with autocast():
            t = self.teacher_forward(teacher, gc, masks)
            s = student(gc, lc, masks)

        t_dino = self.dino_targets(t["dino_logits"], teacher_temp)
        student_chunks = list(s["dino_logits"].chunk(2))
        if n_local:
            student_chunks += list(s["dino_local_logits"].chunk(n_local))
        l_dino = dino_loss(student_chunks, list(t_dino.chunk(2)), cfg.student_temp, n_global=2)

        t_ibot = self.ibot_targets(t["ibot_logits"], teacher_temp)
        l_ibot = ibot_loss(s["ibot_logits"], t_ibot, ibot_mask_weights(masks), n_images,
                           cfg.student_temp)

        crops = s["cls"].chunk(2)  # the regularisers compare different images of one view
        l_kde = sum(kde_loss(c, cfg.kde_kappa, cfg.kde_gather) for c in crops) / len(crops)
        l_koleo = sum(koleo_loss(c) for c in crops) / len(crops)

        total = (cfg.dino_weight * l_dino + cfg.ibot_weight * l_ibot
                 + cfg.kde_weight * l_kde + cfg.koleo_weight * l_koleo)
        losses = {"loss": total, "loss_dino": l_dino, "loss_ibot": l_ibot, "loss_kde": l_kde,
                  "loss_koleo": l_koleo}
        monitors = self.monitors(s["cls"][:batch_size], t["cls"][:batch_size], t_dino)
        return losses, monitors

    @staticmethod
    @torch.no_grad()
    def monitors(student_cls: torch.Tensor, teacher_cls: torch.Tensor,
                 teacher_probs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Collapse monitors on one global crop: mean pairwise cosine (-> 1 when collapsed),
        per-dimension std of the normalised teacher CLS (-> 0; ~1/sqrt(dim) when spread), mean
        entropy of the teacher targets and entropy of their batch mean (-> 0 when collapsed)."""
        z = F.normalize(teacher_cls.float(), dim=-1)
        p = teacher_probs.float()
        entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
        mean_p = p.mean(0)
        return {
            "student_cls_cos": mean_pairwise_cosine(student_cls),
            "teacher_cls_cos": mean_pairwise_cosine(teacher_cls),
            "teacher_cls_std": z.std(dim=0).mean() if len(z) > 1 else z.new_zeros(()),
            "teacher_entropy": entropy,
            "teacher_batch_entropy": -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum(),
        }

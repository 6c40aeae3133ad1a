"""The DINOv2 objective of one augmented batch: teacher and student forwards, the loss terms
combined with their weights, and the collapse monitors."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from midnight_train.method.losses import (
    TeacherTargets,
    dino_loss,
    ibot_loss,
    kde_loss,
    koleo_loss,
    mean_pairwise_cosine,
)
from midnight_train.method.models import ModelConfig, SSLNetwork


@dataclass
class LossConfig:
    """The `loss:` section of the training config."""

    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    # Both regularisers: weight x (the term of global crop 1 + that of global crop 2), DINOv2's
    # convention for KoLeo (not the mean of the two: 0.05 here is 0.1 x their mean)
    kde_weight: float = 0.0  # Midnight: KDE uniformity on the student CLS of each global crop
    kde_kappa: float = 5.0
    kde_gather: bool = True  # estimate the density over all ranks' embeddings
    koleo_weight: float = 0.0  # DINOv2's KoLeo (0.1 there), for ablations
    teacher_targets: str = "sinkhorn_knopp"  # or "centering"
    sk_iterations: int = 3
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_start: float = 0.04
    teacher_temp_warmup_steps: int = 0


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

    def forward(self, student: nn.Module, teacher: SSLNetwork, batch: dict,
                teacher_temp: float,
                autocast: Callable[[], AbstractContextManager] = nullcontext,
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Returns ``(losses, monitors)``; ``losses["loss"]`` is the weighted total to minimise."""
        cfg = self.cfg
        gc, lc, masks = batch["global_crops"], batch["local_crops"], batch["masks"]
        indices = batch["mask_indices"]
        n_images = gc.shape[0]
        batch_size = n_images // 2
        n_local = lc.shape[0] // batch_size if lc is not None and lc.numel() else 0
        # Both forwards under autocast: Accelerate's data-parallel wrapper would add it to the
        # student's, a sharded student has none (FSDP's bf16 parameters alone would run norms
        # and softmax in bf16). The losses take fp32 copies of what they read.
        # One call per network (one FSDP root each): the teacher sees the unmasked crops.
        with autocast():
            with torch.no_grad():
                t = teacher(gc, mask_indices=indices)
            s = student(gc, lc, masks, indices)

        t_dino = self.dino_targets(t["dino_logits"], teacher_temp)
        student_chunks = list(s["dino_logits"].chunk(2))
        if n_local:
            student_chunks += list(s["dino_local_logits"].chunk(n_local))
        l_dino = dino_loss(student_chunks, list(t_dino.chunk(2)), cfg.student_temp, n_global=2)

        t_ibot = self.ibot_targets(t["ibot_logits"], teacher_temp)
        l_ibot = ibot_loss(s["ibot_logits"], t_ibot, batch["mask_weights"], n_images,
                           cfg.student_temp)

        # The regularisers compare different images of one view, and are summed over the two
        # global crops as DINOv2 sums KoLeo (its koleo_loss_weight 0.1 means 0.1 x that sum).
        crops = s["cls"].chunk(2)
        l_kde = sum(kde_loss(c, cfg.kde_kappa, cfg.kde_gather) for c in crops)
        l_koleo = sum(koleo_loss(c) for c in crops)

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

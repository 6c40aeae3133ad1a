"""SSL loss terms: DINO (CLS), iBOT (masked patches), KDE uniformity and KoLeo regularisers.

Teacher targets come from Sinkhorn–Knopp (DINOv2 for ViT-g) or from softmax centering (DINO).
Both are correct under data parallelism: the normalising sums are all-reduced over ranks, so a
run on 32 GPUs computes the same targets as one GPU holding the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Teacher targets ``[N, K]`` whose rows sum to 1 and whose prototype (column) totals are
    pushed towards uniform over the GLOBAL batch (all ranks' rows together).

    Works on the transport plan Q = exp(logits / temp): alternately scale every column to total
    1/K and every row to total 1/N_global, then rescale rows to sum to 1.
    """
    q = logits.float() / temp
    q_max = q.max().clone() if q.numel() else torch.full((), -math.inf, device=q.device)
    if _distributed():  # one shared shift keeps the ranks' plans on the same scale
        dist.all_reduce(q_max, op=dist.ReduceOp.MAX)
    q = torch.exp(q - q_max)
    n_rows = all_reduce_sum(torch.full((), float(q.shape[0]), device=q.device))  # a fill, no copy
    k = q.shape[1]
    q /= all_reduce_sum(q.sum()).clamp_min(1e-30)
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=0, keepdim=True)).clamp_min(1e-30) * k
        q /= q.sum(dim=1, keepdim=True).clamp_min(1e-30) * n_rows
    return q * n_rows


class TeacherTargets(nn.Module):
    """Turns teacher logits into target distributions: ``sinkhorn_knopp`` or ``centering``.

    Centering keeps an EMA ``center`` buffer (saved with the checkpoints)."""

    def __init__(self, out_dim: int, mode: str = "sinkhorn_knopp", center_momentum: float = 0.9,
                 sk_iterations: int = 3):
        super().__init__()
        if mode not in ("sinkhorn_knopp", "centering"):
            raise ValueError(f"unknown teacher target mode {mode!r}")
        self.mode, self.momentum, self.sk_iterations = mode, center_momentum, sk_iterations
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, temp: float, update: bool = True) -> torch.Tensor:
        if self.mode == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.sk_iterations)
        logits = logits.float()
        probs = F.softmax((logits - self.center) / temp, dim=-1)
        if update:
            total = all_reduce_sum(logits.sum(dim=0, keepdim=True))
            count = all_reduce_sum(torch.full((), float(logits.shape[0]), device=logits.device))
            mean = total / count.clamp_min(1.0)
            self.center.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
        return probs


def dino_loss(student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor],
              student_temp: float, n_global: int) -> torch.Tensor:
    """Cross-entropy between each teacher global crop and every student crop except the same view.

    ``student_logits``: the global crops first (``n_global`` of them), then the local crops, each
    ``[B, K]``; ``teacher_probs``: ``n_global`` tensors ``[B, K]``. The result is the mean over the
    (teacher, student) pairs of the batch-mean cross-entropy."""
    log_p = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student_logits]
    total, pairs = student_logits[0].new_zeros((), dtype=torch.float32), 0
    for ti, t in enumerate(teacher_probs):
        for si, s in enumerate(log_p):
            if si < n_global and si == ti:
                continue
            total = total - (t * s).sum(dim=-1).mean()
            pairs += 1
    return total / max(pairs, 1)


def ibot_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, weights: torch.Tensor,
              n_images: int, student_temp: float) -> torch.Tensor:
    """Cross-entropy on masked patches: the mean over each image's masked patches, summed over
    images and divided by all ``n_images`` global crops (unmasked ones contribute zero).
    ``weights``: 1 / (masked patches of its image) per row (`data.masking.masked_positions`)."""
    ce = -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    return (ce * weights).sum() / max(n_images, 1)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, with gradients flowing back to the rank that produced them."""
    if not _distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def kde_loss(embeddings: torch.Tensor, kappa: float = 5.0, gather: bool = True) -> torch.Tensor:
    """KDE uniformity regulariser (von Mises–Fisher kernel, Wang & Isola):
    ``log( mean_{i != j} exp(kappa * (z_i . z_j - 1)) )`` over L2-normalised ``z``. MINIMISING it
    spreads the embeddings over the sphere (never flip this sign: that pulls them together).

    With ``gather`` the local rows are compared against all ranks' rows (the per-GPU batch of 12
    is too small for a density estimate)."""
    z = F.normalize(embeddings.float(), dim=-1)
    others = gather_with_grad(z) if gather else z
    n_local, n_all = z.shape[0], others.shape[0]
    if n_all < 2:
        return z.sum() * 0.0
    sim = z @ others.T
    offset = dist.get_rank() * n_local if (gather and _distributed()) else 0
    self_pair = torch.zeros_like(sim, dtype=torch.bool)
    rows = torch.arange(n_local, device=z.device)
    self_pair[rows, rows + offset] = True
    logits = (kappa * (sim - 1.0)).masked_fill(self_pair, float("-inf"))
    return torch.logsumexp(logits.flatten(), dim=0) - math.log(n_local * (n_all - 1))


def koleo_loss(embeddings: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Kozachenko–Leonenko entropy estimator): ``-mean log d(z_i, nearest other z)``."""
    z = F.normalize(embeddings.float(), dim=-1, eps=eps)
    if z.shape[0] < 2:
        return z.sum() * 0.0
    with torch.no_grad():
        sim = z @ z.T
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)
    dist_nn = (z - z[nearest]).norm(dim=-1)
    return -torch.log(dist_nn + eps).mean()


def mean_pairwise_cosine(x: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over distinct pairs (collapse monitor: -> 1 when collapsed)."""
    z = F.normalize(x.float(), dim=-1)
    n = z.shape[0]
    if n < 2:
        return z.new_zeros(())
    s = z.sum(dim=0)
    return ((s @ s) - n) / (n * (n - 1))

"""Loss terms: Sinkhorn–Knopp normalisation, KDE sign, KoLeo, DINO/iBOT bookkeeping."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from midnight_train.method.losses import (
    TeacherTargets,
    dino_loss,
    ibot_loss,
    kde_loss,
    koleo_loss,
    mean_pairwise_cosine,
    sinkhorn_knopp,
)


def test_sinkhorn_knopp_rows_and_columns_normalised():
    g = torch.Generator().manual_seed(0)
    logits = F.normalize(torch.randn(64, 16, generator=g), dim=-1) * 0.8
    logits[:, 0] += 0.5  # a prototype the softmax favours
    q = sinkhorn_knopp(logits, temp=0.1, n_iterations=3)
    assert torch.allclose(q.sum(dim=1), torch.ones(64), atol=1e-5)
    assert (q >= 0).all()
    cols = q.sum(dim=0)
    soft_cols = F.softmax(logits / 0.1, dim=-1).sum(dim=0)
    target = torch.full((16,), 64 / 16)
    # three iterations already balance the prototypes far better than a softmax ...
    assert (cols - target).abs().max() < 0.25 * (soft_cols - target).abs().max()
    # ... and iterating converges to exactly uniform columns
    q50 = sinkhorn_knopp(logits, temp=0.1, n_iterations=50)
    assert torch.allclose(q50.sum(dim=0), target, rtol=1e-3)
    assert torch.allclose(q50.sum(dim=1), torch.ones(64), atol=1e-5)


def test_sinkhorn_knopp_is_stable_and_handles_no_rows():
    q = sinkhorn_knopp(torch.randn(8, 4) * 50, temp=0.04)
    assert torch.isfinite(q).all()
    assert sinkhorn_knopp(torch.zeros(0, 4), temp=0.04).shape == (0, 4)


def test_centering_updates_center_and_normalises():
    targets = TeacherTargets(8, mode="centering", center_momentum=0.5)
    logits = torch.randn(10, 8)
    p = targets(logits, temp=0.1)
    assert torch.allclose(p.sum(-1), torch.ones(10), atol=1e-5)
    assert torch.allclose(targets.center, 0.5 * logits.mean(0, keepdim=True))


def _spread_by_gradient(loss_fn, steps=30):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 16, generator=g)
    z = (base + 0.3 * torch.randn(32, 16, generator=g)).requires_grad_(True)  # clustered
    before = mean_pairwise_cosine(z.detach())
    opt = torch.optim.SGD([z], lr=5.0)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(z).backward()
        opt.step()
    return before, mean_pairwise_cosine(z.detach())


def test_kde_minimised_spreads_embeddings_and_flipped_sign_collapses():
    before, after = _spread_by_gradient(lambda z: kde_loss(z, kappa=5.0))
    assert after < before - 0.2
    before, after = _spread_by_gradient(lambda z: -kde_loss(z, kappa=5.0))
    assert after > before  # the sign bug of a public reproduction: pulls them together


def test_kde_value_matches_formula():
    z = F.normalize(torch.randn(6, 5), dim=-1)
    sims = z @ z.T
    off = ~torch.eye(6, dtype=torch.bool)
    expected = torch.log(torch.exp(5.0 * (sims[off] - 1)).mean())
    assert torch.allclose(kde_loss(z, 5.0), expected, atol=1e-6)
    assert kde_loss(torch.ones(4, 3), 5.0).abs() < 1e-6  # collapsed: log(1) = 0, the maximum


def test_koleo_lower_when_spread():
    spread = torch.eye(8)
    clustered = torch.ones(8, 8) + 0.01 * torch.randn(8, 8)
    assert koleo_loss(spread) < koleo_loss(clustered)
    before, after = _spread_by_gradient(koleo_loss)
    assert after < before


def test_dino_loss_skips_same_view_and_averages_pairs():
    t = [F.softmax(torch.randn(4, 8), -1) for _ in range(2)]
    s = [torch.randn(4, 8) for _ in range(4)]  # 2 global + 2 local
    got = dino_loss(s, t, student_temp=0.1, n_global=2)
    terms = []
    for ti in range(2):
        for si in range(4):
            if si != ti:
                terms.append(-(t[ti] * F.log_softmax(s[si] / 0.1, -1)).sum(-1).mean())
    assert len(terms) == 6
    assert torch.allclose(got, torch.stack(terms).mean())


def test_ibot_weights_make_each_masked_image_count_once():
    from midnight_train.data.masking import masked_positions

    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    indices, w = masked_positions(masks.numpy())
    assert indices.tolist() == torch.flatten(masks).nonzero().flatten().tolist() == [0, 1, 8]
    w = torch.from_numpy(w)
    assert torch.allclose(w, torch.tensor([0.5, 0.5, 1.0]))
    k = 5
    teacher = F.one_hot(torch.tensor([0, 1, 2]), k).float()
    student = torch.zeros(3, k)  # uniform prediction: CE = log k on every patch
    loss = ibot_loss(student, teacher, w, n_images=3, student_temp=0.1)
    assert math.isclose(float(loss), 2 * math.log(k) / 3, rel_tol=1e-6)


def test_regularisers_are_weighted_sums_over_the_two_global_crops_as_dinov2():
    """DINOv2 adds koleo_loss_weight x (KoLeo of global crop 1 + that of crop 2); KDE the same
    way here, so loss.kde_weight 0.05 is the former 0.1 x their mean."""
    from midnight_train.data.masking import masked_positions
    from midnight_train.method.models import ModelConfig
    from midnight_train.method.objective import LossConfig, SSLObjective
    from midnight_train.method.student_teacher import build_student_teacher

    torch.manual_seed(0)
    model = ModelConfig(img_size=28, timm_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2},
                        head_n_prototypes=16, head_hidden_dim=16, head_bottleneck_dim=8)
    student, teacher = build_student_teacher(model)
    loss = LossConfig(dino_weight=0.0, ibot_weight=0.0, kde_weight=0.3, koleo_weight=0.2,
                      kde_gather=False)
    masks = torch.zeros(8, 4, dtype=torch.bool)
    masks[0, :2] = True
    indices, weights = masked_positions(masks.numpy())
    batch = {"global_crops": torch.randn(8, 3, 28, 28), "local_crops": torch.randn(8, 3, 14, 14),
             "masks": masks, "mask_indices": torch.from_numpy(indices),
             "mask_weights": torch.from_numpy(weights)}
    losses, _ = SSLObjective(model, loss)(student.eval(), teacher, batch, 0.07)
    crop1, crop2 = student(batch["global_crops"], None, masks)["cls"].chunk(2)
    kde = kde_loss(crop1, 5.0, False) + kde_loss(crop2, 5.0, False)
    koleo = koleo_loss(crop1) + koleo_loss(crop2)
    assert torch.allclose(losses["loss_kde"], kde) and torch.allclose(losses["loss_koleo"], koleo)
    assert torch.allclose(losses["loss"], 0.3 * kde + 0.2 * koleo)

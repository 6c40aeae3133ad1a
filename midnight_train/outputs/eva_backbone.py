"""A backbone for kaiko's eva benchmarks (the suite the Midnight paper reports): an exported
model folder whose forward gives the CLS+Mean embedding. eva builds it from its YAML with
`class_path: eva.core.models.ModelFromFunction` and `path: midnight_train.outputs.eva_backbone.backbone`
(see examples/eva/)."""

from __future__ import annotations

import torch
from torch import nn

from midnight_train.outputs.embed import cls_mean_embedding
from midnight_train.outputs.export import load_exported


class ClsMean(nn.Module):
    """images [B, 3, H, W] (normalised as the export says) → [B, 2·dim] (or [B, dim], CLS only)."""

    def __init__(self, vit: nn.Module, cls_only: bool = False) -> None:
        super().__init__()
        self.vit, self.cls_only = vit.eval(), cls_only

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        emb = cls_mean_embedding(self.vit, images)
        return emb[:, : emb.shape[1] // 2] if self.cls_only else emb


def backbone(export: str, cls_only: bool = False) -> nn.Module:
    """The exported folder (or an older single-file export) as an eva backbone."""
    return ClsMean(load_exported(export), cls_only)


def embedding_size(export: str, cls_only: bool = False) -> int:
    """What to give eva as the head's input size (IN_FEATURES)."""
    vit = load_exported(export)
    return vit.num_features * (1 if cls_only else 2)


if __name__ == "__main__":  # IN_FEATURES=$(python -m midnight_train.outputs.eva_backbone EXPORT)
    import sys

    print(embedding_size(sys.argv[1]))

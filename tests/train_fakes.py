"""Test helpers for the trainer: a tiny config and an in-memory stand-in for the data pipeline with
the same contract (batch layout, ``state_dict``/``counters``, exact continuation from a state),
so loop mechanics can be tested in seconds. End-to-end tests use the real pipeline on shards."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from midnight_train.config import Config, TrainConfig
from midnight_train.data.masking import masked_positions
from midnight_train.method.models import ModelConfig
from midnight_train.method.objective import LossConfig

MEAN = torch.tensor([0.707, 0.578, 0.703]).view(1, 3, 1, 1)
STD = torch.tensor([0.212, 0.230, 0.178]).view(1, 3, 1, 1)


@dataclass
class FakeData:
    batch_size: int = 4
    global_crop_size: int = 28
    local_crop_size: int = 14
    n_local_crops: int = 2
    patch_size: int = 14


def mask_fields(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """``masks`` with the masked positions the loader hands over beside them."""
    indices, weights = masked_positions(masks.numpy())
    return {"masks": masks, "mask_indices": torch.from_numpy(indices),
            "mask_weights": torch.from_numpy(weights)}


class FakeLoader:
    """Batch i is a pure function of (seed, rank, i): resuming from ``{"position": i}`` continues
    exactly."""

    def __init__(self, cfg: FakeData, *, seed: int, rank: int, world_size: int, state=None):
        self.cfg, self.seed, self.rank = cfg, seed, rank
        self.position = 0 if state is None else int(state["position"])

    def __iter__(self):
        return self

    def __next__(self):
        c = self.cfg
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.rank * 1009 + self.position)
        self.position += 1
        B, G, L = c.batch_size, c.global_crop_size, c.local_crop_size
        n_patches = (G // c.patch_size) ** 2
        masks = torch.rand(2 * B, n_patches, generator=g) < 0.3
        masks[::2] = False  # half of the images unmasked, as DINOv2
        return {
            **mask_fields(masks),
            "global_crops": torch.randint(0, 256, (2, B, 3, G, G), dtype=torch.uint8, generator=g),
            "local_crops": torch.randint(0, 256, (c.n_local_crops, B, 3, L, L), dtype=torch.uint8,
                                         generator=g),
            "keys": [f"k{self.position}_{i}" for i in range(B)],
        }

    def state_dict(self):
        return {"position": self.position}

    def counters(self):
        return {"corrupt": 0}


def fake_augment(batch, generator):
    """Normalise and flatten like ColorAugment (plus a little generator-driven noise)."""
    out = dict(batch)
    for name in ("global_crops", "local_crops"):
        x = batch[name].flatten(0, 1).float() / 255.0
        x = x + 0.01 * torch.randn(x.shape, generator=generator, device=x.device)
        out[name] = (x - MEAN.to(x.device)) / STD.to(x.device)
    return out


def tiny_model(**kw) -> ModelConfig:
    base = dict(arch="vit_small_patch14_dinov2", img_size=28, drop_path_rate=0.1,
                timm_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2},
                head_n_prototypes=64, head_hidden_dim=64, head_bottleneck_dim=32)
    base.update(kw)
    return ModelConfig(**base)


def tiny_config(output_dir, *, train=None, loss=None, data=None, model=None) -> Config:
    return Config(
        output_dir=str(output_dir),
        data=FakeData(**(data or {})),
        model=tiny_model(**(model or {})),
        loss=LossConfig(**(loss or {})),
        train=TrainConfig(**{"max_steps": 4, "base_lr": 1e-3, "lr_scaling": "none",
                             "checkpoint_every": 2, "tensorboard": False, "progress": False,
                             **(train or {})}),
    )


def make_trainer(cfg):
    from midnight_train.loop.trainer import Trainer

    return Trainer(cfg, make_loader=FakeLoader, augment=fake_augment)

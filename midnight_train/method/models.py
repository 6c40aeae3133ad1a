"""Backbones (timm ViTs with patch 14, DINOv2 style), DINO/iBOT projection heads and loading of the
public DINOv2 weights from a local file (with position-embedding interpolation)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn


@dataclass
class ModelConfig:
    """The student/teacher architecture. ``arch`` is a timm model name (``vit_{small,base,large,
    giant}_patch14[_reg4]_dinov2``); ``timm_kwargs`` overrides its arguments (tiny test models:
    ``{embed_dim: 48, depth: 2, num_heads: 2}``)."""

    arch: str = "vit_small_patch14_dinov2"
    img_size: int = 224  # global crop size: the size of the position-embedding grid
    drop_path_rate: float = 0.1
    # the same stochastic-depth rate in every block, as DINOv2's ViT-g/L configs
    # (drop_path_uniform); false: timm's linear 0 -> rate over the blocks (half the mean)
    drop_path_uniform: bool = False
    layer_scale_init: float = 1e-5
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None  # local path of DINOv2 weights (.pth / .safetensors)
    grad_checkpointing: bool = False  # activation checkpointing of the transformer blocks
    head_n_prototypes: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    ibot_separate_head: bool = False
    ibot_n_prototypes: int = 65536  # used only with a separate iBOT head
    # the separate iBOT head's bottleneck (null: head_bottleneck_dim); DINOv2's ViT-g widens
    # only the DINO head's (384) and keeps the iBOT head's at 256
    ibot_bottleneck_dim: int | None = None


def timm_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """Everything besides the name that ``timm.create_model`` needs to rebuild the backbone."""
    return {"img_size": cfg.img_size, "num_classes": 0, "dynamic_img_size": True,
            "init_values": cfg.layer_scale_init, **cfg.timm_kwargs}


def create_vit(cfg: ModelConfig) -> VisionTransformer:
    """The timm ViT of ``cfg``, randomly initialised (``Backbone.from_config`` loads
    ``cfg.pretrained`` into it and into the mask token)."""
    model = timm.create_model(cfg.arch, pretrained=False, drop_path_rate=cfg.drop_path_rate,
                              **timm_kwargs(cfg))
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"{cfg.arch} is not a timm VisionTransformer")
    if cfg.drop_path_uniform and cfg.drop_path_rate > 0:
        for block in model.blocks:
            block.drop_path1 = DropPath(cfg.drop_path_rate)
            block.drop_path2 = DropPath(cfg.drop_path_rate)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("teacher", "model", "state_dict"):  # common wrappers around the weights
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


MASK_TOKEN = "mask_token"  # the key in DINOv2's checkpoints and in our exports, shape [1, dim]


def load_dinov2_weights(model: VisionTransformer, path: str | Path) -> torch.Tensor | None:
    """Load weights in the original DINOv2 layout (``mask_token``, ``register_tokens``, SwiGLU
    ``w12``/``w3``, 37x37 position grid from 518 px), in timm's layout (our exports) or a
    training checkpoint's (``backbone.vit.*``) into ``model``; return the file's iBOT mask token
    (``[dim]``), or None when it has none.

    timm's converter renames the keys and resamples the position embedding to the model's grid
    (e.g. 37x37 -> 16x16 for 224 px crops) so that nothing is silently truncated or mismatched;
    it drops ``mask_token``, which is returned instead (iBOT then starts from the pretrained token,
    as in DINOv2, not from zeros).
    """
    state = read_state_dict(path)
    state = {k.removeprefix("backbone.").removeprefix("vit."): v for k, v in state.items()
             if not k.startswith(("dino_head.", "ibot_head.", "head."))}
    mask_token = state.get(MASK_TOKEN)
    state = checkpoint_filter_fn(state, model)  # its DINOv2 branch (keyed on mask_token) drops it
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights in {path} do not fit {type(model).__name__}: "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    if mask_token is None:
        return None
    if mask_token.numel() != model.embed_dim:
        raise ValueError(f"weights in {path}: mask_token has {mask_token.numel()} values, the "
                         f"model's embedding has {model.embed_dim}")
    return mask_token.reshape(model.embed_dim).float()


class Backbone(nn.Module):
    """A timm ViT plus the iBOT mask token. ``forward`` returns the final-norm tokens."""

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit
        self.mask_token = nn.Parameter(torch.zeros(vit.embed_dim))
        self.num_prefix_tokens = vit.num_prefix_tokens  # CLS + registers

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Backbone:
        """The backbone of ``cfg``, with ``cfg.pretrained`` loaded into the ViT and the mask
        token (a file without one, e.g. an export of an older version, leaves it at zero)."""
        backbone = cls(create_vit(cfg))
        if cfg.pretrained:
            token = load_dinov2_weights(backbone.vit, cfg.pretrained)
            if token is not None:
                with torch.no_grad():
                    backbone.mask_token.copy_(token)
        return backbone

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(images)  # [B, h, w, C] with dynamic_img_size
        if masks is not None:
            # Masked patches become the mask token BEFORE position embeddings are added (iBOT).
            m = masks.view(x.shape[0], x.shape[1], x.shape[2], 1)
            x = torch.where(m, self.mask_token.to(x.dtype), x)
        x = vit._pos_embed(x)
        x = vit.norm_pre(vit.patch_drop(x))
        if vit.grad_checkpointing and torch.is_grad_enabled():
            # Non-reentrant: the backbone runs twice per step (global, local crops), and DDP
            # refuses reentrant checkpoints there ("mark a variable ready only once").
            x = checkpoint_seq(vit.blocks, x, use_reentrant=False)
        else:
            x = vit.blocks(x)
        return vit.norm(x)


class WeightNormLinear(nn.Module):
    """DINOv2's weight-normalised prototype layer, ``x @ (g * v / |v|).T`` (torch's weight_norm,
    written out so that it needs no parametrisation: simple for FSDP and for freezing).
    ``weight`` is v with nn.Linear's default init (DINOv2 makes this layer after its truncated-
    normal init of the MLP); the gain ``weight_g`` [out, 1] starts at 1 and is trained, with
    weight decay and the last layer's lr (its name holds ``last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear.reset_parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_g * F.normalize(self.weight, dim=-1, eps=1e-6))


class DINOHead(nn.Module):
    """MLP (nlayers, GELU) -> L2-normalised bottleneck -> weight-normalised linear prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6))


class SSLNetwork(nn.Module):
    """Backbone + DINO head (+ separate iBOT head). One class for the student and the teacher."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = Backbone.from_config(cfg)
        dim = self.backbone.embed_dim
        head = dict(hidden_dim=cfg.head_hidden_dim, bottleneck_dim=cfg.head_bottleneck_dim,
                    nlayers=cfg.head_nlayers)
        self.dino_head = DINOHead(dim, cfg.head_n_prototypes, **head)
        ibot_head = {**head, "bottleneck_dim": cfg.ibot_bottleneck_dim or cfg.head_bottleneck_dim}
        self.ibot_head = (DINOHead(dim, cfg.ibot_n_prototypes, **ibot_head)
                          if cfg.ibot_separate_head else None)

    def ibot(self, tokens: torch.Tensor) -> torch.Tensor:
        return (self.ibot_head or self.dino_head)(tokens)

    def heads(self, cls: torch.Tensor,
              patches: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """DINO logits of the ``cls`` rows and iBOT logits of the ``patches`` rows. With a shared
        head both go through ONE call (one MLP pass, one normalisation of the ``[K, bottleneck]``
        prototype matrix forward and backward): every row is computed independently, so this is
        the same function as two calls."""
        if patches is None:
            return self.dino_head(cls), None
        if self.ibot_head is not None:
            return self.dino_head(cls), self.ibot_head(patches)
        both = self.dino_head(torch.cat([cls, patches]))
        return both[: len(cls)], both[len(cls):]

    def forward(self, global_crops: torch.Tensor, local_crops: torch.Tensor | None = None,
                masks: torch.Tensor | None = None,
                mask_indices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Global crops ``[2B,3,G,G]``, local crops ``[nB,3,L,L]``. ``masks`` ``[2B, n_patches]``
        (the student's) replaces those patches by the mask token; ``mask_indices`` (flat indices
        into ``[2B, n_patches]``, `data.masking.masked_positions`) selects the patch outputs the
        iBOT head scores, for student and teacher alike: an index with a count known on the host,
        so no step waits for the device to count masked patches. Returns the CLS embeddings
        and the head outputs (``ibot_logits`` rows in ``mask_indices`` order)."""
        p = self.backbone.num_prefix_tokens
        tokens = self.backbone(global_crops, masks)
        cls = tokens[:, 0]
        out = {"cls": cls, "patch_tokens": tokens[:, p:]}
        n_global = len(cls)
        if local_crops is not None and local_crops.numel():
            cls = torch.cat([cls, self.backbone(local_crops)[:, 0]])
        masked = None
        if mask_indices is not None:
            n_patches = tokens.shape[1] - p
            masked = tokens[mask_indices // n_patches, p + mask_indices % n_patches]
        dino, ibot = self.heads(cls, masked)
        out["dino_logits"] = dino[:n_global]
        if len(dino) > n_global:
            out["dino_local_logits"] = dino[n_global:]
        if ibot is not None:
            out["ibot_logits"] = ibot
        return out


def export_timm_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """``timm_kwargs`` for an exported backbone: fixed image size (plain timm's default)."""
    return {k: v for k, v in timm_kwargs(cfg).items() if k != "dynamic_img_size"}

"""How the step's kernels are chosen: ``torch.compile`` per ViT block (``train.compile``) and
deterministic algorithms for debugging (``train.deterministic``).

On the CPU a resumed run continues bit for bit. On a GPU it continues statistically equivalent
but not bitwise: flash attention's backward, index atomics (scatter-add) and NCCL's reductions
add in an order that varies. ``deterministic_mode`` trades speed for repeatability there (a
debugging switch, not a training setting)."""

from __future__ import annotations

import os

import torch
from torch import nn


def deterministic_mode() -> str:
    """Deterministic kernels wherever torch has them (a warning where it has none), cuDNN without
    autotuning, cuBLAS with a fixed workspace and attention by the math kernel. Must run before
    the first CUDA matmul (cuBLAS reads its workspace setting once). Returns the run-log line."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    for backend in ("flash", "mem_efficient", "cudnn"):  # their backwards are not deterministic
        enable = getattr(torch.backends.cuda, f"enable_{backend}_sdp", None)
        if enable is not None:
            enable(False)
    return ("deterministic kernels (train.deterministic=true): deterministic algorithms, cuDNN "
            "without autotuning, CUBLAS_WORKSPACE_CONFIG="
            f"{os.environ['CUBLAS_WORKSPACE_CONFIG']}, attention by the math kernel; slower")


def compile_blocks(*networks: nn.Module) -> int:
    """``torch.compile`` each ViT block of each network (``SSLNetwork``) in place, before any
    sharding (FSDP's units then wrap compiled blocks; the hooks between blocks stay eager). A
    block is the unit every crop size reuses, so each shape compiles once; returns the count."""
    count = 0
    for net in networks:
        for block in net.backbone.vit.blocks:
            block.compile(dynamic=False)
            count += 1
    # Blocks share one forward code object; each compiled variant (crop shape, train or eval,
    # a block's own drop-path rate) takes a cache entry: room for all, not eager after 8.
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                4 * count + 8)
    return count

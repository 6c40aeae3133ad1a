"""Distribution: which precision and layout a run trains in (and which source decided, for the
run log), the device mesh, and the FSDP2 sharding of student and teacher.

DDP (the default under ``accelerate launch``/``torchrun``) replicates the student; the teacher is
a plain module on every process, updated by the same EMA, so it stays in sync without
communication. FSDP (``train.fsdp=true`` or ``accelerate launch --use_fsdp``) shards both alike
(``shard_student_teacher``), so each process's teacher slices pair with its student slices for
the EMA; bf16 compute, fp32 master weights and gradient reductions."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from midnight_train.method.student_teacher import DTensor


def _accelerate_config_precision() -> tuple[str | None, Path | None]:
    """``mixed_precision`` of Accelerate's default config file (``accelerate config`` writes it;
    ``accelerate launch`` reads it when no --config_file is given), if there is one."""
    try:
        from accelerate.commands.config.config_args import default_config_file
    except ImportError:
        return None, None
    path = Path(default_config_file)
    try:
        import yaml

        value = (yaml.safe_load(path.read_text()) or {}).get("mixed_precision")
    except (OSError, ValueError, AttributeError):
        return None, None
    return (str(value) if value is not None else None), path


def resolve_mixed_precision(configured: str, *, cpu: bool,
                            environ: dict[str, str] | None = None) -> tuple[str, str]:
    """The precision to train in (no / bf16 / fp16) and which source decided, for the run log.

    An explicit ``train.mixed_precision`` wins. ``auto`` takes Accelerate's choice when one was
    made: ``accelerate launch --mixed_precision X`` or its config file, both passed to the
    processes as ``ACCELERATE_MIXED_PRECISION``; else bf16 on a GPU, fp32 on the CPU.
    ``accelerate launch`` also passes ``no`` when nothing was chosen, so ``no`` counts as a
    choice only when Accelerate's default config file says so (``--mixed_precision no`` on the
    command line cannot be told apart from the default: use ``train.mixed_precision=no``)."""
    env = os.environ if environ is None else environ
    launched = env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() or None
    if configured != "auto":
        ignored = launched not in (None, "no", configured)
        return configured, (f"train.mixed_precision={configured} in the config"
                            + (f"; accelerate launch's {launched} ignored" if ignored else ""))
    auto = "train.mixed_precision=auto: "
    if launched in ("bf16", "fp16"):
        return launched, auto + "accelerate launch's choice (--mixed_precision or its config)"
    if launched == "no":
        from_file, path = _accelerate_config_precision()
        if from_file == "no":
            return "no", auto + f"mixed_precision 'no' in {path}"
    default, why = ("no", "fp32 on the CPU") if cpu else ("bf16", "bf16 on a GPU")
    if launched not in (None, "no"):
        why += f" (accelerate launch's {launched} is not supported here)"
    return default, auto + why


def resolve_fsdp(configured: bool, environ: dict[str, str] | None = None) -> tuple[bool, str]:
    """Whether to shard with FSDP, and which source decided: ``train.fsdp=true`` or
    ``accelerate launch --use_fsdp`` (an Accelerate config with ``distributed_type: FSDP``),
    which passes ``ACCELERATE_USE_FSDP=true`` to the processes. That variable is then removed,
    so that Accelerate stays in data-parallel mode and the trainer's own FSDP2 layout
    (``shard_student_teacher``) applies; Accelerate's FSDP_* options are not used."""
    env = os.environ if environ is None else environ
    launched = env.pop("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")
    if configured:
        return True, "train.fsdp=true"
    if launched:
        return True, "accelerate launch --use_fsdp"
    return False, ""


@dataclass(frozen=True)
class ShardLayout:
    """Where each process's FSDP slices come from: ``n_replicas`` groups of ``shard_size``
    processes (consecutive ranks, so a group is a node under torchrun); each group holds one
    whole copy, cut into ``shard_size`` slices. ``n_replicas == 1`` is plain FSDP over all
    processes; more is hybrid sharding (HSDP: gradients reduce-scattered within a group and
    all-reduced across groups, parameters all-gathered within a group only)."""

    shard_size: int
    n_replicas: int
    shard_rank: int  # this process's slice
    replica: int  # this process's group
    keep_gathered: bool  # student blocks stay gathered from forward to backward

    def describe(self, world_size: int) -> str:
        if self.n_replicas == 1:
            how = f"sharded over {world_size} process(es)"
        else:
            how = (f"hybrid: sharded within groups of {self.shard_size} process(es), replicated "
                   f"over {self.n_replicas} groups")
        keep = ("the student's blocks stay gathered from forward to backward (one all-gather per "
                "block per micro-step; train.fsdp_keep_gathered)" if self.keep_gathered else
                "the student's blocks are gathered again for each pass (least memory; "
                "train.fsdp_keep_gathered=false)")
        return f"student and teacher {how}, one unit per ViT block; {keep}"


def shard_layout(rank: int, world_size: int, shard_size: int, keep_gathered: bool,
                 environ: dict[str, str] | None = None) -> ShardLayout:
    """The layout of ``train.fsdp_shard_size`` (0: the processes of one node, i.e. hybrid
    sharding on several nodes, as torchrun's LOCAL_WORLD_SIZE says)."""
    env = os.environ if environ is None else environ
    size = shard_size or int(env.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    size = min(max(size, 1), world_size)
    if world_size % size:
        raise ValueError(f"train.fsdp_shard_size={size} does not divide the {world_size} "
                         f"processes: use a divisor of {world_size} (0: one node's processes)")
    return ShardLayout(size, world_size // size, rank % size, rank // size, keep_gathered)


def device_mesh(device: torch.device, num_processes: int, layout: ShardLayout,
                timeout: timedelta | None = None):
    """The FSDP2 mesh: 1-D over all processes, or 2-D (replicate, shard) for hybrid sharding;
    a single process gets a process group of one."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    if layout.n_replicas == 1:
        return init_device_mesh(device.type, (num_processes,))
    return init_device_mesh(device.type, (layout.n_replicas, layout.shard_size),
                            mesh_dim_names=("replicate", "shard"))


def shard_student_teacher(student: torch.nn.Module, teacher: torch.nn.Module, mesh,
                          param_dtype: torch.dtype | None, keep_gathered: bool = True) -> None:
    """Shard both networks (``SSLNetwork``) with FSDP2 (``fully_shard``) over ``mesh``, in place:
    one unit per ViT block, one for the rest of the backbone (patch embedding, tokens, final
    norm), one per head, then the network. Every parameter is split along its first dimension
    the same way in both, so each process's teacher shard pairs with its student shard for the
    EMA, with no communication. ``param_dtype`` (bf16) is the compute precision of the gathered
    parameters; the shards (master weights, optimiser state) stay fp32 and gradients are reduced
    in fp32.

    The student runs its backbone twice per micro-step (global, then local crops) and backward
    once: resharding after each forward gathers every block four times per micro-step.
    ``keep_gathered`` keeps the student's units gathered from their first forward until after
    backward (one all-gather each; costs the gathered bf16 weights, 2 bytes per parameter). The
    teacher reshards after its forward (it has no backward to do it)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for net, reshard, root_reshard in ((student, not keep_gathered, None), (teacher, True, True)):
        units = [*net.backbone.vit.blocks, net.backbone, net.dino_head]
        if net.ibot_head is not None:
            units.append(net.ibot_head)
        for unit in units:
            fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=root_reshard)
    # The network's outputs are views (slices of the token tensor); nothing writes into them in
    # place, which is what FSDP2 warns about on every run.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def split_sharded(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A sharded module's state dict -> (this process's slices, copied to the CPU; the rest)."""
    own = {k: v.to_local().to("cpu", copy=True) for k, v in state.items()
           if isinstance(v, DTensor)}
    return own, {k: v for k, v in state.items() if k not in own}


def rank_slice(whole: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Process ``rank``'s slice of a whole tensor as FSDP2 cuts it (``torch.chunk`` along the
    first dimension; processes past the last chunk get an empty one)."""
    chunks = torch.chunk(whole, world_size, dim=0)
    return chunks[rank] if rank < len(chunks) else whole[:0]

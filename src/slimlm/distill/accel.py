"""Accelerate glue: CPU process groups, the sharded backends, releasing global state."""

from __future__ import annotations

import os

import torch

from ..errors import SlimlmError


def cpu_only() -> bool:
    """True on machines without an accelerator, so that `torchrun --nproc_per_node N` gives N CPU processes (gloo).

    Accelerate only forms a CPU process group when told `cpu=True` (or `accelerate launch --cpu`).
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    if torch.cuda.is_available():
        return False
    probe = getattr(torch, "accelerator", None)
    return not (probe is not None and probe.is_available())


def shards_parameters(accelerator) -> bool:
    """True under FSDP or DeepSpeed (parameters sharded across processes)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def check_fsdp_version(accelerator) -> None:
    """SlimlmError under FSDP version 1: slimlm's sharded layout is FSDP2's (`fully_shard`)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and \
            getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise SlimlmError("slimlm supports FSDP version 2 only (set fsdp_version: 2 in the accelerate config)")


def set_deepspeed_micro_batch(accelerator, micro_batch: int) -> None:
    """Under DeepSpeed, give the engine slimlm's --micro-batch (Accelerate takes it from a dataloader; slimlm has none)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch


def reset_accelerate() -> None:
    """Forget this run's Accelerate settings so that another `distill` call in the process starts clean.

    The process group (PartialState) is kept: under `accelerate launch` it belongs to the launcher.
    """
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    except Exception:
        pass

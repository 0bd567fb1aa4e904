"""Accelerate glue: CPU process groups, the frozen teacher's placement, releasing global state."""

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
    """True under FSDP or DeepSpeed: weights are gathered by module calls, so the fused loss is off."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def prepare_teacher(accelerator, teacher):
    """Place (and under FSDP2 / ZeRO-3, shard) the frozen teacher without giving it an optimizer."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise SlimlmError("slimlm supports FSDP version 2 only (set fsdp_version: 2 in the accelerate config)")
        return fsdp2_prepare_model(accelerator, teacher).eval()
    if kind == DistributedType.DEEPSPEED:
        import copy

        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        stage = config.get("zero_optimization", {}).get("stage", 0)
        if stage != 3:  # ZeRO 1/2 shard only optimizer state: a frozen teacher is simply replicated
            config["zero_optimization"] = {"stage": 0}
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        return engine.eval()
    return teacher.to(accelerator.device)


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

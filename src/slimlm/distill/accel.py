"""Accelerate glue for distillation: the frozen teacher's placement (the rest is in `slimlm.training.setup`)."""

from __future__ import annotations

from ..errors import SlimlmError


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

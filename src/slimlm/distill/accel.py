"""Accelerate glue for distillation's sharded backends (the rest is in `slimlm.training.setup`)."""

from __future__ import annotations

from ..errors import SlimlmError


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

"""Processes and batch arithmetic, the Accelerate set-up, and its release.

Both trainers split a global batch the same way: `global_batch` examples per optimizer step,
`micro_batch` per forward pass per process, and gradient accumulation for the rest.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import SlimlmError


def cpu_only() -> bool:
    """True on machines without an accelerator, so that `torchrun --nproc_per_node N` gives N CPU processes (gloo).

    Accelerate only forms a CPU process group when told `cpu=True` (or `accelerate launch --cpu`).
    """
    import torch

    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    if torch.cuda.is_available():
        return False
    probe = getattr(torch, "accelerator", None)
    return not (probe is not None and probe.is_available())


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's examples are split over processes and micro-batches."""

    processes: int
    micro_batch: int
    global_batch: int
    cpu: bool

    @property
    def accumulation(self) -> int:
        """Micro-batches each process accumulates per optimizer step."""
        return self.global_batch // (self.micro_batch * self.processes)

    @property
    def per_process(self) -> int:
        """Examples each process reads per optimizer step."""
        return self.micro_batch * self.accumulation

    def describe(self) -> dict:
        """The fields `slimlm.json` records under `hyperparameters`."""
        return {"micro_batch": self.micro_batch, "global_batch": self.global_batch,
                "grad_accumulation": self.accumulation, "processes": self.processes}


def plan_batch(micro_batch: int, global_batch: int | None) -> BatchPlan:
    """The batch split for this launch (the process count comes from the launcher); SlimlmError if it does not divide."""
    from accelerate import PartialState

    cpu = cpu_only()
    world = PartialState(cpu=cpu).num_processes
    global_batch = global_batch or micro_batch * world
    if global_batch % (micro_batch * world):
        raise SlimlmError(
            f"--global-batch {global_batch} is not a multiple of micro-batch x processes = {micro_batch} x {world}"
        )
    return BatchPlan(world, micro_batch, global_batch, cpu)


def make_accelerator(batch: BatchPlan, mixed_precision: str):
    """An `Accelerator` that accumulates `batch.accumulation` micro-batches; the scheduler is stepped by the caller.

    SlimlmError (with Accelerate's state released) when an accelerate config overrides the accumulation.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=batch.accumulation, mixed_precision=mixed_precision,
                              cpu=batch.cpu, step_scheduler_with_optimizer=False)
    if accelerator.gradient_accumulation_steps != batch.accumulation:
        # An accelerate config / ACCELERATE_GRADIENT_ACCUMULATION_STEPS overrides what we pass.
        got = accelerator.gradient_accumulation_steps
        reset_accelerate()
        raise SlimlmError(
            f"the accelerate config sets gradient accumulation to {got}, but --global-batch {batch.global_batch} "
            f"needs {batch.accumulation}; remove gradient_accumulation_steps from the accelerate config"
        )
    return accelerator


def shards_parameters(accelerator) -> bool:
    """True under FSDP or DeepSpeed: weights are gathered by module calls, not held whole by each process."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def reset_accelerate() -> None:
    """Forget this run's Accelerate settings so that another training call in the process starts clean.

    The process group (PartialState) is kept: under `accelerate launch` it belongs to the launcher.
    """
    try:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    except Exception:
        pass


@contextmanager
def accelerate_released():
    """Release Accelerate's global state when the block ends, however it ends."""
    try:
        yield
    finally:
        reset_accelerate()

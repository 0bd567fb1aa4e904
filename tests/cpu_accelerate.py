"""Run `slimlm` under `accelerate launch` on CPUs with the launch config's FSDP2 or DeepSpeed turned on.

    accelerate launch --config_file configs/accelerate/fsdp2_8gpu.yaml --num_processes 2 \\
        --mixed_precision no tests/cpu_accelerate.py distill --teacher ... --student ... -o ...

`accelerate launch` starts the processes and exports the config (ACCELERATE_USE_FSDP, FSDP_*,
ACCELERATE_USE_DEEPSPEED, ...) on a CPU machine as on GPUs, but `AcceleratorState` then picks
FSDP only for accelerator process groups (MULTI_GPU, MULTI_XPU, ...) and DeepSpeed only without
`cpu=True`, so a gloo CPU group silently trains with plain DDP.  This shim extends exactly that
decision to the CPU group: after `AcceleratorState.__init__` it sets the distributed type and plugin
the way Accelerate's own branch does for GPUs.  Everything else (`prepare`, `fsdp2_prepare_model`,
`save_state`, `get_state_dict`, the DeepSpeed engine) is Accelerate's and slimlm's unchanged code.
For tests and debugging only.
"""

from __future__ import annotations

import os
import sys


def extend_accelerate_to_cpu_groups() -> None:
    """Patch `AcceleratorState` (in this process) to apply the launch config's FSDP / DeepSpeed to a CPU group."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_cpu_shim", False):
        return

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        fsdp_plugin, ds_plugin = kwargs.get("fsdp_plugin"), kwargs.get("deepspeed_plugin")
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and fsdp_plugin is not None:
            # As AcceleratorState does for MULTI_GPU (accelerate/state.py, the FSDP branch).
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
        elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and ds_plugin is not None:
            # As AcceleratorState does without cpu=True (accelerate/state.py, the DeepSpeed branch).
            self.distributed_type = DistributedType.DEEPSPEED
            plugins = ds_plugin.values() if isinstance(ds_plugin, dict) else [ds_plugin]
            for plugin in plugins:
                plugin.set_mixed_precision(self._mixed_precision)
            next(iter(plugins)).select(_from_accelerator_state=True)
            self.deepspeed_plugins = ds_plugin
            if self._mixed_precision != "fp8":  # DeepSpeed handles mixed precision from its config
                self._mixed_precision = "no"
        else:
            return
        PartialState._shared_state["distributed_type"] = self.distributed_type

    __init__._cpu_shim = True
    AcceleratorState.__init__ = __init__


def main() -> None:
    extend_accelerate_to_cpu_groups()
    from slimlm.cli import main as slimlm_main

    sys.argv = ["slimlm", *sys.argv[1:]]
    slimlm_main()


if __name__ == "__main__":
    main()

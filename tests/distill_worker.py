"""One `slimlm.distill.distill` run, for tests that start it under `accelerate launch` on CPUs.

    accelerate launch --config_file configs/accelerate/fsdp2_8gpu.yaml --num_processes 2 \\
        --mixed_precision no tests/distill_worker.py SPEC.json

SPEC.json: ``{"teacher": ..., "student": ..., "data": ..., "out": ..., "kwargs": {...}}`` (the arguments
of `distill`), and optionally ``"kill_after_step": N``: the main process kills itself with SIGKILL
once step N is logged, a crash in the middle of the run (the launcher then ends the other
processes).  The launch config's FSDP2 or DeepSpeed is turned on for the CPU process group by
`cpu_accelerate` (Accelerate alone would run plain DDP there); the trainer is slimlm's, unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cpu_accelerate import extend_accelerate_to_cpu_groups  # noqa: E402


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    extend_accelerate_to_cpu_groups()
    from slimlm.distill import distill

    on_step = None
    if spec.get("kill_after_step") is not None:
        def on_step(record):
            if record["step"] == spec["kill_after_step"]:
                os.kill(os.getpid(), signal.SIGKILL)

    distill(spec["teacher"], spec["student"], spec["data"], spec["out"], on_step=on_step, **spec["kwargs"])


if __name__ == "__main__":
    main()

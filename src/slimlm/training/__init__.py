"""The training core: what `slimlm.distill` and `slimlm.align` are short recipes on.

- `setup`: processes, micro / global batch and gradient accumulation (`BatchPlan`), the
  Accelerate set-up and its release;
- `precision`: compute dtype, mixed precision and fp32 master weights (`Precision`);
- `run_folder`: the output folder of a run: checks before any work, `--resume` checks, and
  the clean-up of a run that fails before its first checkpoint (`RunFolder`, `resumable`);
- `checkpoint`: slimlm's checkpoints (safetensors and JSON: nothing is unpickled on
  `--resume`) and the Hugging Face Trainer's;
- `monitor`: `metrics.jsonl`, TensorBoard and the progress bar;
- `schedule`: linear warm-up then cosine decay;
- `provenance`: the fields of `slimlm.json` every trainer writes.

Importing this package does not import torch (the CLI's `--help` stays fast).
"""

from __future__ import annotations

from .run_folder import RunFolder, resumable

__all__ = ["RunFolder", "resumable"]

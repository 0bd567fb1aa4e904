"""Precision: the dtype a run computes in, and the fp32 master weights it trains.

One rule for every trainer and every way a model arrives (a path, or a model object already
in memory, e.g. a search candidate pruned from a bf16 teacher):

- the trained model holds fp32 weights, so AdamW updates fp32 master weights;
- with a bf16 / fp16 compute dtype (``--dtype auto`` on GPUs), mixed precision runs the
  forward and backward under autocast in that dtype (Accelerate's ``mixed_precision``);
- frozen models (the teacher, DPO's reference) are loaded in the compute dtype; a frozen model
  passed as an object runs in the dtype it has (casting it would change the caller's model,
  e.g. the teacher a search prunes every candidate from);
- the exported model is written in the compute dtype.

On CPUs ``auto`` is fp32 (bf16 is several times slower there), so nothing is cast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import pick_dtype

MASTER_DTYPE = torch.float32


@dataclass(frozen=True)
class Precision:
    """The compute dtype of a run and what follows from it."""

    compute: torch.dtype

    @classmethod
    def from_setting(cls, dtype) -> "Precision":
        """From a ``--dtype`` value: 'auto', 'fp32', 'bf16', 'fp16' (SlimlmError for others)."""
        return cls(pick_dtype(dtype))

    @property
    def mixed(self) -> str:
        """Accelerate's / the Trainer's mixed-precision mode: 'no', 'bf16' or 'fp16'."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.compute, "no")

    @property
    def master(self) -> torch.dtype:
        """The dtype of trained weights (and of a trained model loaded from a path)."""
        return MASTER_DTYPE

    def trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` (trained in place) with fp32 master weights: a bf16 / fp16 model object is upcast.

        Only floating-point parameters and buffers change dtype; a model already in fp32 is untouched.
        """
        if any(p.is_floating_point() and p.dtype != self.master for p in model.parameters()):
            model.to(self.master)
        return model

    def describe(self) -> dict:
        """The fields `slimlm.json` records under `hyperparameters`."""
        return {"dtype": str(self.compute).replace("torch.", ""), "mixed_precision": self.mixed}

"""Distillation (Minitron step 4) and LM-loss training (teacher correction).

`distill(teacher, student, data, out, tokens, ...)` is the API the CLI calls (a front door to
`DistillRecipe`); the chunked losses it uses are `FusedKDLoss`, `CheckpointedKDLoss` and
`PlainKDLoss` (`kd_loss` in one call).
"""

from __future__ import annotations

__all__ = ["distill", "correct_teacher", "DistillRecipe", "DistillResult", "NonFiniteLossError", "kd_loss",
           "naive_kd_loss", "FusedKDLoss", "CheckpointedKDLoss", "PlainKDLoss", "LOSSES"]
_TRAINER = ("distill", "correct_teacher", "DistillRecipe", "DistillResult", "NonFiniteLossError")


def __getattr__(name):
    # Lazy: `slimlm --help` imports slimlm.distill.cli, which must not pull in torch/accelerate.
    if name in _TRAINER:
        from . import trainer

        return getattr(trainer, name)
    if name in __all__:
        from . import loss

        return getattr(loss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

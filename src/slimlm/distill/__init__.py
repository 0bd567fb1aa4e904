"""Distillation (Minitron step 4) and LM-loss training (teacher correction).

`distill(teacher, student, data, out, tokens, ...)` is the API the CLI calls;
`kd_loss` is the memory-bounded chunked loss it uses.
"""

from __future__ import annotations

__all__ = ["distill", "correct_teacher", "DistillResult", "NonFiniteLossError", "kd_loss", "naive_kd_loss", "LOSSES"]


def __getattr__(name):
    # Lazy: `slimlm --help` imports slimlm.distill.cli, which must not pull in torch/accelerate.
    if name in ("distill", "correct_teacher", "DistillResult", "NonFiniteLossError"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("kd_loss", "naive_kd_loss", "LOSSES"):
        from . import loss

        return getattr(loss, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
